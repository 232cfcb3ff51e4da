"""The `ferry` command: virsh names and habits, one host per `-H`.

Errors are one line `error: ...` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from scripts.cli import formats
from scripts.cli.common import Formatter, Handler, client, domain_cmd, emit, host_of, read_input
from workers.errors import FerryError


def cmd_define(a: argparse.Namespace) -> int:
    info = client().call(host_of(a), "define", xml=read_input(a.file))
    return emit(a, info, lambda i: f"Domain '{i['name']}' defined on {i['host']}")


def _simple(task: str, done: str) -> Handler:
    def run(a: argparse.Namespace) -> int:
        kwargs: dict[str, Any] = {"domain": a.domain}
        if task == "start":
            kwargs["paused"] = a.paused
        info = client().call(host_of(a), task, **kwargs)
        return emit(a, info, lambda i: f"Domain '{i['name']}' {done}")
    return run


def cmd_list(a: argparse.Namespace) -> int:
    return emit(a, client().call(host_of(a), "list", all=a.all), formats.domain_list)


def cmd_dominfo(a: argparse.Namespace) -> int:
    return emit(a, client().call(host_of(a), "dominfo", domain=a.domain), formats.dominfo)


def cmd_domstate(a: argparse.Namespace) -> int:
    info = client().call(host_of(a), "dominfo", domain=a.domain)
    return emit(a, {"state": info["state"], "reason": info["reason"]},
                lambda s: f"{s['state']} ({s['reason']})" if a.reason else s["state"])


def cmd_dumpxml(a: argparse.Namespace) -> int:
    xml = client().call(host_of(a), "dumpxml", domain=a.domain, inactive=a.inactive,
                        migratable=a.migratable)
    print(xml.rstrip())
    return 0


def cmd_domblkstat(a: argparse.Namespace) -> int:
    stats = client().call(host_of(a), "domblkstat", domain=a.domain, device=a.device)
    return emit(a, stats, formats.blkstat)


def cmd_domblkinfo(a: argparse.Namespace) -> int:
    info = client().call(host_of(a), "domblkinfo", domain=a.domain, device=a.device)
    return emit(a, info, formats.blkinfo)


def cmd_monitor(a: argparse.Namespace) -> int:
    reply = client().call(host_of(a), "qemu_monitor_command", domain=a.domain,
                          command=" ".join(a.command), hmp=a.hmp)
    print(reply if isinstance(reply, str) else json.dumps(reply, indent=2 if a.pretty else None))
    return 0


def cmd_domlocks(a: argparse.Namespace) -> int:
    info = client().call(host_of(a), "domlocks", domain=a.domain)
    return emit(a, info, formats.locks)


def cmd_hosts(a: argparse.Namespace) -> int:
    items = client().hosts()
    for line in formats.tls_warnings(items):
        print(line, file=sys.stderr)
    return emit(a, items, formats.hosts)


# worker, up, demo and tls-init are imported when run: they pull in Celery's worker, the
# host agent and the test bed, which the other commands (and --help) do not need.
def cmd_worker(a: argparse.Namespace) -> int:
    from scripts.cli.worker import run_worker

    return run_worker(a)


def cmd_up(a: argparse.Namespace) -> int:
    from scripts.cli.up import run_up

    return run_up(a)


def cmd_tls_init(a: argparse.Namespace) -> int:
    from scripts.cli.tls_init import cmd_tls_init  # cryptography: ~100 ms of start-up

    return cmd_tls_init(a)


def cmd_demo(a: argparse.Namespace) -> int:
    from scripts.cli.demo import run_demo

    return run_demo(a)


# The commands migrate_cmd and image_cmd define (tests/unit/test_cli_parser.py checks
# these against the modules): `ferry CMD` builds CMD's parser alone and imports no other
# command module; --help, an unknown command and any argument error get the whole
# parser, so what they print is argparse's usual text.
MIGRATE_COMMANDS = ("migrate", "domjobinfo", "domjobabort", "migrate-setspeed",
                    "migrate-getspeed", "migrate-setmaxdowntime", "migrate-postcopy")
IMAGE_COMMANDS = ("save", "restore", "dump")
SIMPLE = (("undefine", "undefine", "has been undefined"), ("start", "start", "started"),
          ("destroy", "destroy", "destroyed"), ("suspend", "suspend", "suspended"),
          ("resume", "resume", "resumed"))
OWN_COMMANDS = ("worker", "up", "demo", "hosts", "define", *(s[0] for s in SIMPLE), "list",
                "dominfo", "domlocks", "domstate", "dumpxml", "domblkstat", "domblkinfo",
                "qemu-monitor-command", "tls-init")


class ArgumentError(Exception):
    """An argument error of a one-command parser: the whole parser reports it."""


class _OneCommandParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ArgumentError(message)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (`only`) one with that command's subparser alone."""
    cls = argparse.ArgumentParser if only is None else _OneCommandParser
    parser = cls(prog="ferry", description=__doc__, formatter_class=Formatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def wanted(*names: str) -> bool:
        return only is None or only in names

    if wanted("worker"):
        w = sub.add_parser("worker", help="run a host: a Celery worker on queue host.NAME",
                           formatter_class=Formatter)
        w.add_argument("--host", required=True)
        w.add_argument("--uuid")
        w.add_argument("--state-dir")
        w.add_argument("--migration-address")
        w.add_argument("--loglevel")
        w.set_defaults(handler=cmd_worker)

    for name, handler, help_ in (("up", cmd_up, "run redis and hosts in the foreground"),
                                 ("demo", cmd_demo, "the guided demo")):
        if not wanted(name):
            continue
        p = sub.add_parser(name, help=help_, formatter_class=Formatter)
        p.add_argument("--hosts", default="alpha,beta")
        p.add_argument("--flower", action="store_true")
        if name == "up":
            p.add_argument("--sentinel", action="store_true",
                           help="a Redis master, replica and three sentinels, not one Redis")
        p.set_defaults(handler=handler)

    if wanted("hosts"):
        domain_cmd(sub, "hosts", cmd_hosts, "list hosts and whether they are alive")
    if wanted("define"):
        domain_cmd(sub, "define", cmd_define, "define a domain from XML").add_argument("file")
    for name, task, done in SIMPLE:
        if not wanted(name):
            continue
        p = domain_cmd(sub, name, _simple(task, done), f"{name} a domain")
        p.add_argument("domain")
        if name == "start":
            p.add_argument("--paused", action="store_true")
    if wanted("list"):
        domain_cmd(sub, "list", cmd_list, "list domains").add_argument("--all",
                                                                        action="store_true")
    if wanted("dominfo"):
        domain_cmd(sub, "dominfo", cmd_dominfo, "domain information").add_argument("domain")
    if wanted("domlocks"):
        domain_cmd(sub, "domlocks", cmd_domlocks, "leases of a domain").add_argument("domain")
    if wanted("domstate"):
        p = domain_cmd(sub, "domstate", cmd_domstate, "domain state")
        p.add_argument("domain")
        p.add_argument("--reason", action="store_true")
    if wanted("dumpxml"):
        p = domain_cmd(sub, "dumpxml", cmd_dumpxml, "domain XML")
        p.add_argument("domain")
        p.add_argument("--inactive", action="store_true")
        p.add_argument("--migratable", action="store_true")
    if wanted("domblkstat"):
        p = domain_cmd(sub, "domblkstat", cmd_domblkstat, "disk I/O statistics")
        p.add_argument("domain")
        p.add_argument("device", nargs="?")
    if wanted("domblkinfo"):
        p = domain_cmd(sub, "domblkinfo", cmd_domblkinfo, "disk size information")
        p.add_argument("domain")
        p.add_argument("device")
    if wanted("qemu-monitor-command"):
        p = domain_cmd(sub, "qemu-monitor-command", cmd_monitor, "QMP/HMP passthrough")
        p.add_argument("domain")
        p.add_argument("command", nargs="+")
        p.add_argument("--hmp", action="store_true")
        p.add_argument("--pretty", action="store_true")
    # The command modules are imported only for their own commands (and the whole parser).
    if wanted(*MIGRATE_COMMANDS):
        from scripts.cli import migrate_cmd

        migrate_cmd.add_parsers(sub, only)
    if wanted("tls-init"):
        p = sub.add_parser("tls-init", help="make a CA and migration TLS certificates for hosts")
        p.add_argument("out", help="directory: OUT/ca holds the CA, OUT/NAME each host's files")
        p.add_argument("hosts", nargs="+", metavar="NAME=ADDRESS[,ADDRESS]")
        p.add_argument("--days", type=int, default=365, help="host certificates' lifetime")
        p.set_defaults(handler=cmd_tls_init)
    if wanted(*IMAGE_COMMANDS):
        from scripts.cli import image_cmd

        image_cmd.add_parsers(sub, only)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments, parsed by the command's own parser when the command is known."""
    command = argv[0] if argv else ""
    if command in (*OWN_COMMANDS, *MIGRATE_COMMANDS, *IMAGE_COMMANDS):
        try:
            return build_parser(only=command).parse_args(argv)
        except ArgumentError:
            pass  # the whole parser says it, as usual
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    status = run(args)
    if argv is None and getattr(args, "quick_exit", False):
        # The `ferry` command itself, done: its output flushed, the process ends without
        # the interpreter's teardown (80-90 ms once Celery is loaded).
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)
    return status


def run(args: argparse.Namespace) -> int:
    try:
        return int(args.handler(args))
    except FerryError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
    except Exception as exc:  # never a traceback for the operator
        print(f"error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
