"""The ferry side: a guest on a local ferry (redis + hosts alpha and beta) moved to and fro.

One sample is one managed v3 live migration as a service runs it:
`Client.migrate(domain, src, dst, live=True).wait()`, the wall time measured
here around that call, plus QEMU's own figures from the summary statistics
and ferry's per-phase times from the summary's "phases".
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.settings import load
from scripts.testbed.stack import Stack, wait_for
from tasks.client import Client
from workers.migration.progress import downtime_steps

HOSTS = ("alpha", "beta")
MIGRATION_TIMEOUT_S = 600.0


@dataclass
class FerrySample:
    wall_ms: float
    downtime_ms: int | None
    time_elapsed_ms: int | None
    setup_time_ms: int | None
    memory_processed: int | None
    memory_bps: int | None
    memory_iteration: int | None
    phases: list[dict[str, Any]]
    direction: str


def start_stack(stack: Stack) -> Client:
    """redis-server and the workers alpha and beta on `stack`; the caller stops the Stack."""
    stack.start_redis()
    for name in HOSTS:
        stack.start_worker(name, wait=False)
    for name in HOSTS:
        proc = stack.workers[name].proc
        assert proc is not None
        stack.wait_alive(name, proc.pid)
    return Client(load({"FERRY_BROKER_URL": stack.broker_url}))


@dataclass
class FerryGuest:
    """A guest defined and started on alpha; `migrate()` moves it to the other host."""

    client: Client
    name: str
    xml: str
    at: str = HOSTS[0]

    def start(self) -> None:
        self.client.call(self.at, "define", xml=self.xml)
        self.client.call(self.at, "start", domain=self.name)

    def migrate(self, **options: Any) -> FerrySample:
        """One live migration to the other host; `options` as Client.migrate (p2p=True, ...)."""
        src = self.at
        dst = HOSTS[1] if src == HOSTS[0] else HOSTS[0]
        t0 = time.perf_counter()
        summary = self.client.migrate(self.name, src, dst, live=True, **options).wait(
            timeout=MIGRATION_TIMEOUT_S)
        wall_ms = (time.perf_counter() - t0) * 1000
        if summary.get("result") != "completed":
            raise RuntimeError(f"ferry migration {src}->{dst} did not complete: {summary}")
        self.at = dst
        stats = summary.get("statistics") or {}
        return FerrySample(
            wall_ms=wall_ms, downtime_ms=stats.get("downtime"),
            time_elapsed_ms=stats.get("time_elapsed"), setup_time_ms=stats.get("setup_time"),
            memory_processed=stats.get("memory_processed"), memory_bps=stats.get("memory_bps"),
            memory_iteration=stats.get("memory_iteration"),
            phases=[{"phase": p["phase"], "host": p["host"], "elapsed_ms": p["elapsed_ms"]}
                    for p in summary.get("phases", [])],
            direction=f"{src}->{dst}")

    def remove(self) -> None:
        """Destroy and undefine the guest wherever it is (best effort)."""
        for host in HOSTS:
            for task in ("destroy", "undefine"):
                with contextlib.suppress(Exception):
                    self.client.call(host, task, domain=self.name, timeout=30)


def wait_filled(serial: Path, timeout: float, what: str) -> None:
    """Until the guest has printed `ferry-guest filled` (its random memory is written)."""

    def filled() -> bool:
        try:
            return "ferry-guest filled" in serial.read_text(errors="replace")
        except FileNotFoundError:
            return False

    wait_for(filled, timeout, what, interval=0.2)


def ferry_initial_downtime_ms(memory_mib: int) -> int:
    """The downtime-limit ferry's workers start a migration with (their schedule's first step).

    Read from the same FERRY_* environment the workers of the Stack get.
    """
    s = load()
    steps = downtime_steps(s.downtime_ms, s.downtime_steps, s.downtime_delay_s, memory_mib / 1024)
    return next(iter(steps))[1]


def foreign_qemu(own_marker: str) -> int:
    """QEMU processes on this machine that are not ours (their argv does not name our root)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in argv.split(b"\0", 1)[0] and own_marker.encode() not in argv:
            count += 1
    return count
