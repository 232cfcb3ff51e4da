"""The `ferry` command: virsh names and habits, one host per `-H`.

Errors are one line `error: ...` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scripts import formats
from workers.errors import FerryError, InvalidInputError

Handler = Callable[[argparse.Namespace], int]


def _client() -> Any:
    from tasks.client import Client

    return Client()


def _emit(args: argparse.Namespace, value: Any, human: Callable[[Any], str]) -> int:
    print(formats.as_json(value) if getattr(args, "json", False) else human(value))
    return 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text() if path != "-" else sys.stdin.read()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from exc


def _host(args: argparse.Namespace) -> str:
    if args.host:
        return str(args.host)
    from config.settings import load

    return load().host


def cmd_define(a: argparse.Namespace) -> int:
    info = _client().call(_host(a), "define", xml=_read(a.file))
    return _emit(a, info, lambda i: f"Domain '{i['name']}' defined on {i['host']}")


def _simple(task: str, done: str) -> Handler:
    def run(a: argparse.Namespace) -> int:
        kwargs: dict[str, Any] = {"domain": a.domain}
        if task == "start":
            kwargs["paused"] = a.paused
        info = _client().call(_host(a), task, **kwargs)
        return _emit(a, info, lambda i: f"Domain '{i['name']}' {done}")
    return run


def cmd_list(a: argparse.Namespace) -> int:
    return _emit(a, _client().call(_host(a), "list", all=a.all), formats.domain_list)


def cmd_dominfo(a: argparse.Namespace) -> int:
    return _emit(a, _client().call(_host(a), "dominfo", domain=a.domain), formats.dominfo)


def cmd_domstate(a: argparse.Namespace) -> int:
    info = _client().call(_host(a), "dominfo", domain=a.domain)
    return _emit(a, {"state": info["state"], "reason": info["reason"]},
                 lambda s: f"{s['state']} ({s['reason']})" if a.reason else s["state"])


def cmd_dumpxml(a: argparse.Namespace) -> int:
    xml = _client().call(_host(a), "dumpxml", domain=a.domain, inactive=a.inactive,
                         migratable=a.migratable)
    print(xml.rstrip())
    return 0


def cmd_domblkstat(a: argparse.Namespace) -> int:
    stats = _client().call(_host(a), "domblkstat", domain=a.domain, device=a.device)
    return _emit(a, stats, formats.blkstat)


def cmd_domblkinfo(a: argparse.Namespace) -> int:
    info = _client().call(_host(a), "domblkinfo", domain=a.domain, device=a.device)
    return _emit(a, info, formats.blkinfo)


def cmd_monitor(a: argparse.Namespace) -> int:
    reply = _client().call(_host(a), "qemu_monitor_command", domain=a.domain,
                           command=" ".join(a.command), hmp=a.hmp)
    print(reply if isinstance(reply, str) else json.dumps(reply, indent=2 if a.pretty else None))
    return 0


def cmd_domlocks(a: argparse.Namespace) -> int:
    info = _client().call(_host(a), "domlocks", domain=a.domain)
    return _emit(a, info, formats.locks)


def cmd_hosts(a: argparse.Namespace) -> int:
    return _emit(a, _client().hosts(), formats.hosts)


def cmd_worker(a: argparse.Namespace) -> int:
    from scripts.worker import run_worker

    return run_worker(a)


def cmd_up(a: argparse.Namespace) -> int:
    from scripts.up import run_up

    return run_up(a)


def cmd_demo(a: argparse.Namespace) -> int:
    from scripts.demo import run_demo

    return run_demo(a)


def _domain_cmd(sub: Any, name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_)
    p.add_argument("-H", "--host", help="the host to act on (default: FERRY_HOST)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("worker", help="run a host: a Celery worker on queue host.NAME")
    w.add_argument("--host", required=True)
    w.add_argument("--uuid")
    w.add_argument("--state-dir")
    w.add_argument("--migration-address")
    w.add_argument("--loglevel")
    w.set_defaults(handler=cmd_worker)

    for name, handler, help_ in (("up", cmd_up, "run redis and hosts in the foreground"),
                                 ("demo", cmd_demo, "the guided demo")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--hosts", default="alpha,beta")
        p.add_argument("--flower", action="store_true")
        if name == "up":
            p.add_argument("--sentinel", action="store_true",
                           help="a Redis master, replica and three sentinels, not one Redis")
        p.set_defaults(handler=handler)

    _domain_cmd(sub, "hosts", cmd_hosts, "list hosts and whether they are alive")
    _domain_cmd(sub, "define", cmd_define, "define a domain from XML").add_argument("file")
    for name, task, done in (("undefine", "undefine", "has been undefined"),
                             ("start", "start", "started"), ("destroy", "destroy", "destroyed"),
                             ("suspend", "suspend", "suspended"),
                             ("resume", "resume", "resumed")):
        p = _domain_cmd(sub, name, _simple(task, done), f"{name} a domain")
        p.add_argument("domain")
        if name == "start":
            p.add_argument("--paused", action="store_true")
    _domain_cmd(sub, "list", cmd_list, "list domains").add_argument("--all", action="store_true")
    _domain_cmd(sub, "dominfo", cmd_dominfo, "domain information").add_argument("domain")
    _domain_cmd(sub, "domlocks", cmd_domlocks, "leases of a domain").add_argument("domain")
    p = _domain_cmd(sub, "domstate", cmd_domstate, "domain state")
    p.add_argument("domain")
    p.add_argument("--reason", action="store_true")
    p = _domain_cmd(sub, "dumpxml", cmd_dumpxml, "domain XML")
    p.add_argument("domain")
    p.add_argument("--inactive", action="store_true")
    p.add_argument("--migratable", action="store_true")
    p = _domain_cmd(sub, "domblkstat", cmd_domblkstat, "disk I/O statistics")
    p.add_argument("domain")
    p.add_argument("device", nargs="?")
    p = _domain_cmd(sub, "domblkinfo", cmd_domblkinfo, "disk size information")
    p.add_argument("domain")
    p.add_argument("device")
    p = _domain_cmd(sub, "qemu-monitor-command", cmd_monitor, "QMP/HMP passthrough")
    p.add_argument("domain")
    p.add_argument("command", nargs="+")
    p.add_argument("--hmp", action="store_true")
    p.add_argument("--pretty", action="store_true")
    from scripts.migrate_cmd import add_parsers

    add_parsers(sub, _domain_cmd)
    from scripts.image_cmd import add_parsers as add_image_parsers

    add_image_parsers(sub, _domain_cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
