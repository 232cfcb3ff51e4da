"""`ferry migrate` and `ferry domjobinfo`: start a migration, follow it, report it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from scripts.cli import formats
from scripts.cli.common import Handler, client, domain_cmd, emit, host_of
from workers.errors import FerryError, InvalidInputError

COMMANDS = ("migrate", "domjobinfo", "domjobabort", "migrate-setspeed", "migrate-getspeed",
            "migrate-setmaxdowntime", "migrate-postcopy")
SIGNALS = (("domjobabort", "abort", None, "abort the domain's job"),
           ("migrate-setspeed", "setspeed", "bandwidth", "set the bandwidth (MiB/s)"),
           ("migrate-getspeed", "getspeed", None, "the bandwidth (MiB/s)"),
           ("migrate-setmaxdowntime", "setmaxdowntime", "downtime", "set max downtime (ms)"),
           ("migrate-postcopy", "postcopy", None, "switch to post-copy"))


def add_parsers(sub: Any, only: str | None = None) -> None:
    """The parsers of COMMANDS (of `only` alone, when given)."""
    if only in (None, "migrate"):
        _migrate_parser(sub)
    if only in (None, "domjobinfo"):
        p = domain_cmd(sub, "domjobinfo", cmd_domjobinfo, "job information")
        p.add_argument("domain")
        p.add_argument("--completed", action="store_true")
    for name, op, arg, help_ in SIGNALS:
        if only not in (None, name):
            continue
        p = domain_cmd(sub, name, _signal_cmd(op, arg), help_)
        p.add_argument("domain")
        if arg:
            p.add_argument(arg, type=int)


def _migrate_parser(sub: Any) -> None:
    p = domain_cmd(sub, "migrate", cmd_migrate, "migrate a domain to another host")
    p.add_argument("domain")
    p.add_argument("dest", help="the destination host")
    for flag in ("live", "p2p", "tunnelled", "persistent", "undefinesource", "suspend",
                 "offline", "abort-on-error", "auto-converge", "postcopy",
                 "change-protection", "unsafe", "tls", "no-wait"):
        p.add_argument(f"--{flag}", action="store_true")
    p.add_argument("--xml", help="destination domain XML (checked for ABI stability)")
    p.add_argument("--migrateuri", help="QEMU migration URI, tcp:HOST[:PORT]")
    p.add_argument("--bandwidth", type=int, default=0, help="MiB/s (default: unlimited)")
    p.add_argument("--timeout", type=int, help="pause the guest after S seconds to converge")
    p.add_argument("--max-downtime", type=int, help="ms")
    p.add_argument("--protocol", type=int, choices=(2, 3), default=3)
    p.add_argument("--copy-storage-all", action="store_true",
                   help="copy the guest's disks to the dest (NBD)")
    p.add_argument("--copy-storage-inc", action="store_true",
                   help="copy only the top image of each disk (the backing chain is there)")
    p.add_argument("--migrate-disks", metavar="T,T",
                   help="copy only these disk targets (the others must be shared)")
    p.add_argument("--disks-port", type=int, help="the dest's NBD port (default: from "
                   "its migration port range)")
    p.add_argument("--dry-run", action="store_true",
                   help="run Begin's and Prepare's checks only: what would be copied")
    p.add_argument("--parallel", action="store_true",
                   help="several connections at once (QEMU multifd)")
    p.add_argument("--parallel-connections", type=int, metavar="N",
                   help="with --parallel: how many (1-255, default 2)")
    p.add_argument("--compressed", action="store_true",
                   help="compress the stream (default method: xbzrle)")
    p.add_argument("--comp-methods", metavar="LIST",
                   help="xbzrle, or one of zstd, zlib with --parallel")
    p.add_argument("--comp-xbzrle-cache", type=int, metavar="BYTES",
                   help="xbzrle cache size (a power of two)")
    p.add_argument("--comp-zstd-level", type=int, metavar="N", help="0-20 (default 1)")
    p.add_argument("--comp-zlib-level", type=int, metavar="N", help="0-9 (default 1)")


#: the command's own arguments, not the migration's
NOT_OPTIONS = frozenset({"command", "handler", "quick_exit", "host", "json", "domain", "dest",
                         "no_wait", "dry_run", "xml"})
#: CLI names (virsh's) of options named otherwise in tasks/migrate_plan.py
RENAMED = {"bandwidth": "bandwidth_mib_s", "timeout": "timeout_s",
           "max_downtime": "max_downtime_ms", "migrateuri": "migrate_uri"}


def _options(a: argparse.Namespace) -> dict[str, Any]:
    """Every migrate argument but the command's own, as tasks/migrate_plan.py names it:
    a new option reaches both clients (or is refused there as unknown) by its name."""
    opts = {RENAMED.get(k, k): v for k, v in vars(a).items() if k not in NOT_OPTIONS}
    if a.xml:
        try:
            opts["xmlin"] = Path(a.xml).read_text()
        except OSError as exc:
            raise InvalidInputError(f"cannot read {a.xml}: {exc.strerror}") from exc
    return opts


def cmd_migrate(a: argparse.Namespace) -> int:
    api = client()
    source = host_of(a)
    if a.dry_run:
        report = api.migrate_dry_run(a.domain, source, a.dest, **_options(a))
        print(formats.as_json(report) if a.json else formats.dry_run(report))
        return 0
    job = api.migrate(a.domain, source, a.dest, **_options(a))
    if a.no_wait:
        out = {"job_id": job.id, "domain": a.domain, "source": source, "dest": a.dest,
               "result": "started"}
        print(formats.as_json(out) if a.json else f"Migration job {job.id} started")
        return 0
    try:
        summary = _follow(job) if sys.stdout.isatty() and not a.json else job.wait()
    except FerryError as exc:
        if a.json:
            print(formats.as_json({"job_id": job.id, "domain": a.domain, "source": source,
                                   "dest": a.dest, "result": "failed", "error": str(exc)}))
        raise
    if a.json:
        print(formats.as_json(summary))
    else:
        print(formats.migration_summary(summary))
    return 0


def _follow(job: Any) -> dict[str, Any]:
    """A progress bar on a terminal while the migration runs."""
    # Imported here: rich's progress bar is only drawn on a terminal.
    from rich.progress import BarColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.percentage:>3.0f}%"), TransferSpeedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(f"migrating {job.params.domain}", total=None)
        while not job.done():
            try:
                info = job.info()
            except FerryError:
                info = {}
            total, processed = info.get("data_total"), info.get("data_processed")
            if total:  # memory and disks (a storage copy's), as libvirt counts data
                what = "disks" if info.get("disk_remaining") else info.get("phase") or ""
                bar.update(task, total=total, completed=processed or 0,
                           description=f"{job.params.domain} {what}")
            time.sleep(0.25)
    return dict(job.wait())


def cmd_domjobinfo(a: argparse.Namespace) -> int:
    info = client().call(host_of(a), "domjobinfo", domain=a.domain, completed=a.completed)
    return emit(a, info, formats.jobinfo)


def _signal_cmd(op: str, arg: str | None) -> Handler:
    def run(a: argparse.Namespace) -> int:
        args = {arg: getattr(a, arg)} if arg else {}
        result = client().signal(host_of(a), a.domain, op, **args)
        return emit(a, result, lambda r: _human(op, r))
    return run


def _human(op: str, result: Any) -> str:
    if op == "getspeed":
        return str(result["bandwidth"])
    if op == "abort" and result.get("deferred"):
        return "Abort recorded: the job stops at its next phase"
    return {"abort": "Job aborted", "setspeed": "Bandwidth set",
            "setmaxdowntime": "Max downtime set", "postcopy": "Switched to post-copy"}.get(
        op, str(result))
