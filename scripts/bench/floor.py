"""The floor: the same live migration done by hand over QMP, without ferry.

Two QEMU processes on this machine, started with exactly the argv ferry's host
agent would build (`build_qemu_argv`, monitor on an already listening unix
socket handed over as a fd, own session, `-S`), driven with `qemu.qmp`.  One
sample is what ferry's managed v3 chain does at its core, and nothing else:

    start the incoming QEMU (-incoming defer)          <- t0
    dest:   migrate-set-capabilities events
    source: migrate-set-capabilities events
    source: migrate-set-parameters max-bandwidth (ferry's "unlimited") and
            downtime-limit (the first step of ferry's downtime schedule)
    dest:   migrate-incoming tcp:127.0.0.1:PORT
    source: migrate tcp:127.0.0.1:PORT
    dest:   wait for the MIGRATION completed event (no polling)
    dest:   cont                                       <- t1: dest running
    source: wait for its MIGRATION completed event, query-migrate (downtime), quit

wall_ms is t1 - t0; quit_ms (to the source's exit) is kept beside it.  The
next sample goes back: the dest becomes the source.  With `switchover=True` it
also turns on what ferry does at the switch-over (return-path on both ends,
pause-before-switchover on the source, `migrate-continue` at once), so the
guest's pause (STOP on the source to RESUME on the dest, QEMU's timestamps)
can be compared with and without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from scripts.testbed.stack import free_port, stop_pid
from workers.domain import DomainDef
from workers.domain_xml import parse_domain_xml
from workers.migration.params import UNLIMITED_BANDWIDTH_BYTES
from workers.process import listening_socket
from workers.qemu_argv import build_qemu_argv, qemu_has_spice

EVENT_TIMEOUT_S = 600.0
_NETNS_PORTS = itertools.count(50000)  # ports inside fleet namespaces (free_port is root's)
EVENTS_CAP = {"capabilities": [{"capability": "events", "state": True}]}


@dataclass
class FloorQemu:
    """One QEMU process of the floor guest and the only QMP client of its monitor."""

    name: str
    popen: subprocess.Popen[bytes]
    qmp: QMPClient
    migration: EventListener
    cpu: EventListener

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(cmd, args)

    async def wait_migration(self, status: str = "completed") -> None:
        """Until QEMU emits MIGRATION `status`; a failed or cancelled migration raises."""

        async def until() -> None:
            while True:
                event = await self.migration.get()
                data = event.get("data")
                got = data.get("status") if isinstance(data, dict) else None
                if got == status:
                    return
                if got in ("failed", "cancelled"):
                    raise RuntimeError(f"floor migration on {self.name}: {got}")

        await asyncio.wait_for(until(), EVENT_TIMEOUT_S)


@dataclass
class FloorSample:
    wall_ms: float
    quit_ms: float
    downtime_ms: int | None
    total_time_ms: int | None
    setup_time_ms: int | None
    memory_processed: int | None
    mbps: float | None
    dirty_sync_count: int | None
    direction: str
    pause_ms: float | None = None


@dataclass
class FloorGuest:
    """The floor's guest: a running QEMU that `migrate()` moves to a fresh QEMU and back."""

    xml: str
    workdir: Path
    downtime_limit_ms: int | None = None  # None: QEMU's default (300 ms)
    # Fleet hosts (scripts/testbed/fleet.py) of sides A and B: (network namespace, address);
    # None: both sides in this namespace, on 127.0.0.1.
    places: tuple[tuple[str, str], tuple[str, str]] | None = None
    switchover: bool = False  # return-path and pause-before-switchover, as ferry sets them
    kvm: bool = field(default_factory=lambda: os.access("/dev/kvm", os.R_OK | os.W_OK))
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _clients: list[QMPClient] = field(default_factory=list)
    _current: FloorQemu | None = None
    _count: int = 0
    _side: str = "A"

    @property
    def definition(self) -> DomainDef:
        return parse_domain_xml(self.xml)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.poll() is None]

    # -- sync entry points for the driver -----------------------------------------------------
    def start(self) -> None:
        """Boot the guest (QEMU starts paused, as ferry's does, then `cont`)."""
        self._current = self._loop.run_until_complete(self._start())

    def migrate(self) -> FloorSample:
        return self._loop.run_until_complete(self._migrate())

    def close(self) -> None:
        """Stop every QEMU this floor started, by pid; also after a failure or a signal."""
        if self._loop.is_closed():
            return
        self._current = None
        for qmp in self._clients:
            with contextlib.suppress(BaseException):
                self._loop.run_until_complete(asyncio.wait_for(qmp.disconnect(), 5))
        self._clients.clear()
        for popen in self._procs:
            if popen.poll() is None:
                stop_pid(popen.pid, timeout=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=5)
        self._procs.clear()
        pending = asyncio.all_tasks(self._loop)  # a sample cut short by a signal leaves some
        for task in pending:
            task.cancel()
        with contextlib.suppress(BaseException):
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    # -- the QMP work -------------------------------------------------------------------------
    def _place(self, side: str) -> tuple[list[str], str]:
        """(argv prefix, migration address) of side A or B."""
        if self.places is None:
            return [], "127.0.0.1"
        netns, address = self.places[0 if side == "A" else 1]
        return ["ip", "netns", "exec", netns], address

    async def _launch(self, incoming: str | None, side: str = "A") -> FloorQemu:
        self._count += 1
        d = self.definition
        name = f"{d.name}-{self._count}"
        sock_path = self.workdir / f"{name}.qmp"
        sock = listening_socket(sock_path)
        try:
            argv = build_qemu_argv(
                d, qmp_fd=sock.fileno(), pidfile=str(self.workdir / f"{name}.pid"),
                kvm=self.kvm, incoming=incoming, spice=qemu_has_spice(d.emulator))
            argv = [*self._place(side)[0], *argv]
            with open(self.workdir / f"{name}.log", "ab") as out:
                popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    cwd=self.workdir, start_new_session=True, pass_fds=(sock.fileno(),),
                    close_fds=True)
        finally:
            sock.close()
        self._procs.append(popen)
        qmp = QMPClient(name)
        self._clients.append(qmp)
        listener = EventListener(names=("MIGRATION",))
        qmp.register_listener(listener)
        cpu = EventListener(names=("STOP", "RESUME"))
        qmp.register_listener(cpu)
        await asyncio.wait_for(qmp.connect(str(sock_path)), 30)
        return FloorQemu(name, popen, qmp, listener, cpu)

    async def _start(self) -> FloorQemu:
        q = await self._launch(None)
        await q.execute("cont")
        return q

    async def _migrate(self) -> FloorSample:
        src = self._current
        if src is None:
            raise RuntimeError("the floor guest is not running")
        other = "B" if self._side == "A" else "A"
        address = self._place(other)[1]
        port = free_port() if self.places is None else next(_NETNS_PORTS)
        uri = f"tcp:{address}:{port}"
        t0 = time.perf_counter()
        dst = await self._launch("defer", other)
        await dst.execute("migrate-set-capabilities", _caps(self.switchover, outgoing=False))
        await src.execute("migrate-set-capabilities", _caps(self.switchover, outgoing=True))
        params: dict[str, int] = {"max-bandwidth": UNLIMITED_BANDWIDTH_BYTES}
        if self.downtime_limit_ms:
            params["downtime-limit"] = self.downtime_limit_ms
        await src.execute("migrate-set-parameters", params)
        await dst.execute("migrate-incoming", {"uri": uri})
        src.migration.clear()  # its own incoming migration's events, from the last sample
        src.cpu.clear()
        await src.execute("migrate", {"uri": uri})
        if self.switchover:
            await src.wait_migration("pre-switchover")
            await src.execute("migrate-continue", {"state": "pre-switchover"})
        await dst.wait_migration("completed")
        await dst.execute("cont")
        t1 = time.perf_counter()
        pause = _pause_ms(src.cpu, dst.cpu)
        await src.wait_migration("completed")
        info = await src.execute("query-migrate")
        await src.execute("quit")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(src.qmp.disconnect(), 5)
        self._clients.remove(src.qmp)
        await asyncio.get_running_loop().run_in_executor(None, src.popen.wait, 30)
        t2 = time.perf_counter()
        self._procs.remove(src.popen)
        self._current, direction, self._side = dst, f"{self._side}->{other}", other
        ram = info.get("ram") or {}
        return FloorSample(
            wall_ms=(t1 - t0) * 1000, quit_ms=(t2 - t0) * 1000,
            downtime_ms=info.get("downtime"), total_time_ms=info.get("total-time"),
            setup_time_ms=info.get("setup-time"), memory_processed=ram.get("transferred"),
            mbps=ram.get("mbps"), dirty_sync_count=ram.get("dirty-sync-count"),
            direction=direction, pause_ms=pause)


def _caps(switchover: bool, outgoing: bool) -> dict[str, Any]:
    caps = [{"capability": "events", "state": True},
            {"capability": "return-path", "state": switchover}]
    if outgoing:
        caps.append({"capability": "pause-before-switchover", "state": switchover})
    return {"capabilities": caps}


def _stamp(listener: EventListener, name: str) -> float | None:
    """QEMU's time of the last `name` event the listener holds (epoch s); takes them all."""
    last = None
    for event in listener.clear():
        ts = event.get("timestamp") or {}
        if event.get("event") == name and isinstance(ts, dict):
            last = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
    return last


def _pause_ms(src: EventListener, dst: EventListener) -> float | None:
    stop, resume = _stamp(src, "STOP"), _stamp(dst, "RESUME")
    return round((resume - stop) * 1000, 1) if stop and resume and resume >= stop else None
