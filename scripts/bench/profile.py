"""`python -m scripts.bench.profile`: where ferry's own time goes in one managed migration.

A small TCG guest (no random memory: QEMU's transfer is short, so ferry's
share stands out) moved to and fro on a local ferry.  Per migration: the
wall time in the caller, QEMU's own time (the statistics' time_elapsed),
ferry's phases, the time outside them (Celery hand-offs, the client), and
the CPU seconds the two workers and Redis spent (from /proc), and after each
migration `celery_chain`: five near-empty tasks chained over the same hosts
the way the migration's five phases are, i.e. what Celery alone costs.  With
`--log-level DEBUG --keep` the worker logs hold a timeline of every QMP
command and Redis-backed step (scripts/bench/PROFILE.md reads one).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import redis
from celery import chain

from config.celery_app import queue_for
from scripts.bench.migration import FerryGuest, start_stack
from scripts.bench.tunnel_micro import _proc_cpu_s
from scripts.testbed.guestimage import build_image
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import Stack, searchable
from tasks.client import Client


class _Monitor(threading.Thread):
    """Redis MONITOR during one migration: every command with its key, printed at stop."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        # Any: redis's Connection leaves send_command and disconnect unannotated.
        self.conn = cast(Any, redis.Redis.from_url(url).connection_pool.get_connection())
        self.conn.send_command("MONITOR")
        self.conn.read_response()
        self.lines: list[str] = []
        self.halt = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.halt.is_set():
            with contextlib.suppress(redis.TimeoutError):
                line = self.conn.read_response(timeout=0.2)
                self.lines.append(line.decode(errors="replace") if isinstance(line, bytes)
                                  else str(line))

    def stop(self) -> None:
        time.sleep(0.3)  # the tail of the migration's commands
        self.halt.set()
        self.join()
        self.conn.disconnect()
        client = [ln for ln in self.lines if "lua]" not in ln]
        for line in client:
            print("  " + line[:160], file=sys.stderr)
        print(f"{len(client)} commands from clients (and {len(self.lines) - len(client)} "
              "inside scripts)", file=sys.stderr)


def _commands(r: redis.Redis) -> Counter[str]:
    """Calls per Redis command so far (INFO commandstats)."""
    stats = r.info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})


def celery_chain_ms(client: Client, hosts: Sequence[str], payload: dict[str, Any]) -> float:
    """Celery's own floor for the migration's chain: five tasks that do next to nothing
    (`ferry.hosts`: one Redis read), routed like begin3 → prepare3 → perform3 → finish3 →
    confirm3 and carrying 4 KiB in their headers, about a migration state's size, with the
    same settings (late ack, STARTED, events, extended results)."""
    sigs = [client.app.signature("ferry.hosts", queue=queue_for(h), immutable=True,
                                 headers={"ferry_bench_payload": payload})
            for h in (hosts[0], hosts[1], hosts[0], hosts[1], hosts[0])]
    t0 = time.perf_counter()
    chain(*sigs).apply_async().get(timeout=30)
    return (time.perf_counter() - t0) * 1000


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.profile", description=__doc__)
    p.add_argument("--runs", type=int, default=20, help="migrations counted (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="migrations not counted (default 2)")
    p.add_argument("--memory-mib", type=int, default=128, help="guest memory (default 128)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--commands", action="store_true",
                   help="print the Redis commands of the first counted migration")
    p.add_argument("--keep", action="store_true", help="keep the temporary root (logs)")
    args = p.parse_args(argv)
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-prof-", dir="/tmp")))
    stack = Stack(root=root, log_level=args.log_level)
    rows: list[dict[str, float]] = []
    try:
        client = start_stack(stack)
        image = build_image(root / "guest.img")
        xml = guest_xml("prof", image, root / "prof.serial", memory_mib=args.memory_mib,
                        domain_type="qemu")
        guest = FerryGuest(client, "prof", xml)
        guest.start()
        pids = {name: w.proc.pid for name, w in stack.workers.items() if w.proc is not None}
        assert stack.redis_proc is not None
        pids["redis"] = stack.redis_proc.pid
        r = redis.Redis.from_url(stack.broker_url)
        for i in range(args.warmup + args.runs):
            cpu0 = {k: _proc_cpu_s(pid) for k, pid in pids.items()}
            cmds0 = _commands(r)
            monitor = _Monitor(stack.broker_url) if args.commands and i == args.warmup else None
            s = guest.migrate()
            if monitor is not None:
                monitor.stop()
            cpu = {k: _proc_cpu_s(pid) - cpu0[k] for k, pid in pids.items()}
            cmds = _commands(r) - cmds0
            if args.commands and i == args.warmup:
                print("redis commands of one migration: " + ", ".join(
                    f"{k} {v}" for k, v in cmds.most_common()), file=sys.stderr)
            chain_ms = celery_chain_ms(client, s.direction.split("->"), {"state": "x" * 4096})
            phases = {ph["phase"]: ph["elapsed_ms"] for ph in s.phases}
            row = {"wall": s.wall_ms, "qemu": float(s.time_elapsed_ms or 0),
                   "outside_qemu": s.wall_ms - (s.time_elapsed_ms or 0),
                   **phases, "outside_phases": s.wall_ms - sum(phases.values()),
                   **{f"cpu_{k}": v * 1000 for k, v in cpu.items()},
                   "redis_cmds": float(sum(cmds.values()) - 2),  # less the 2 INFO
                   "celery_chain": chain_ms}
            print(f"{'warm-up' if i < args.warmup else i - args.warmup + 1} {s.direction}: "
                  + " ".join(f"{k}={v:.0f}" for k, v in row.items()), file=sys.stderr)
            if i >= args.warmup:
                rows.append(row)
        guest.remove()
    finally:
        stack.stop(kill_guests=True)
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    keys = list(rows[0])
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {args.runs} migrations of a "
          f"{args.memory_mib} MiB TCG guest, medians (ms; cpu_* = CPU ms per migration):")
    print("| " + " | ".join(keys) + " |")
    print("|" + " ---: |" * len(keys))
    print("| " + " | ".join(f"{statistics.median(r.get(k, 0) for r in rows):.0f}"
                            for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
