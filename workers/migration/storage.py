"""Storage copy on the source: the disks go to the dest's NBD exports by QEMU mirrors.

libvirt's order (qemuMigrationSrcNBDStorageCopy, qemuMigrationSrcRun), which QEMU
7.2 needs: mirrors start before `migrate`, every mirror READY, `migrate` with
pause-before-switchover, and at `pre-switchover` (the guest stopped) every
mirror completes (speed 0, a soft cancel, which copies what is left and ends
without pivot: BLOCK_JOB_COMPLETED), the nbd nodes go, then `migrate-continue`.
Without the pause, a mirror with a backlog at the switch-over aborts the
source QEMU on 7.2 (a write to a node already inactive).

Abort at any point: a forced cancel of every mirror, then (a stalled dest
blocks the source's main loop in any drain) `yank` out of band on the nbd
nodes, which fails their I/O at once, then blockdev-del.  The source guest
runs on, on its own disks.  The stall timeout applies: a copy that moves
nothing while it has data left for FERRY_MIGRATION_STALL_TIMEOUT_S fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from workers import failpoints
from workers.abi import check_abi_stability
from workers.agent import HostAgent
from workers.domain import Disk
from workers.domain_states import DomainState
from workers.domain_xml import format_domain_xml
from workers.domobj import DomainObj
from workers.errors import FerryError, MigrationError, QemuError
from workers.heartbeat import get_host
from workers.migration import tls
from workers.migration.chain_state import MigrationState
from workers.migration.cookie import Cookie, CookieNbd
from workers.migration.params import MigrationParams, parse_qemu_uri
from workers.migration.qemu_migrate import nap
from workers.migration.storage_plan import (
    MirrorState,
    RateMeter,
    block_entry,
    check_dest_answer,
    disks_to_copy,
    failure,
    figures,
    nbd_disk,
    node_name,
    update_from_event,
    update_from_query,
)
from workers.monitor import Monitor
from workers.pki import CA_FILE

log = logging.getLogger(__name__)

POLL_S = 0.25
CANCEL_S = 5.0  # how long a forced cancel may take before the nodes are yanked
QUERY_TIMEOUT_S = 10.0


async def begin_nbd(dom: DomainObj, p: MigrationParams, host: str) -> CookieNbd:
    """Begin's <nbd> section: every disk to copy, checked, with its image's facts."""
    disks = disks_to_copy(dom.current, p.migrate_disks)
    for disk in disks:
        assert disk.source is not None
        if not os.path.exists(disk.source):
            raise MigrationError(f"disk {disk.target}: its image {disk.source} does not exist "
                                 f"on host {host}")
    mon = dom.require_monitor("copy storage")
    blocks = await mon.execute("query-block")
    return CookieNbd(0, tuple(nbd_disk(d, block_entry(blocks, d), p.storage_inc)
                              for d in disks))


async def dry_run(agent: HostAgent, p: MigrationParams) -> dict[str, Any]:
    """Begin's checks without a job: the guest can move, the definition the dest would
    get (`--xml` checked for ABI stability), and the disks a storage copy would send."""
    dom = agent.lookup(p.domain)
    dom.require_active("migrate")
    dom.require_state("migrate", DomainState.RUNNING, DomainState.PAUSED)
    dom.require_no_job("migrate")
    chosen = dom.current
    if p.xmlin:
        chosen = agent.parse(p.xmlin)
        check_abi_stability(dom.current, chosen)
    nbd = await begin_nbd(dom, p, agent.host) if p.storage_copy else CookieNbd()
    return {"host": agent.host, "xml": format_domain_xml(chosen, migratable=True),
            "disks": [asdict(d) for d in nbd.disks],
            "sources": {d.target: d.source for d in dom.current.disks}}


def mib_to_speed(mib: int | None) -> int:
    """A bandwidth in MiB/s as a block job speed (bytes/s; 0 is unlimited, as for QEMU)."""
    return (mib or 0) << 20


class StorageCopy:
    """The mirrors of one outgoing migration, from start to completion or abort."""

    def __init__(self, dom: DomainObj, mon: Monitor, disks: list[Disk], *, inc: bool,
                 stall_s: float, tls_creds: str | None = None) -> None:
        self.dom, self.mon, self.inc = dom, mon, inc
        self.mirrors = [MirrorState(d.target, d.drive_id, node_name(d)) for d in disks]
        self.disks = {d.target: d for d in disks}
        self.nodes: list[str] = []  # nbd nodes added (blockdev-del them at the end)
        self.started: list[MirrorState] = []
        self.tls_creds = tls_creds
        self.stall_s = stall_s
        self.meter = RateMeter()
        self.bps = 0
        self.best = -1
        self.since = self.started_at = time.monotonic()
        self.closed = asyncio.Event()
        self.ram_started = False  # the disks are in sync, QEMU's migrate runs
        self.copy_ms: int | None = None  # from the first mirror's start to all in sync
        self._poller: asyncio.Task[None] | None = None

    # -- events and figures --------------------------------------------------------------
    def on_event(self, event: str, data: dict[str, Any]) -> None:
        first_error = event == "BLOCK_JOB_ERROR" and failure(self.mirrors) is None
        m = update_from_event(self.mirrors, event, data)
        if m is not None and (event != "BLOCK_JOB_ERROR" or first_error):
            log.info("domain %s: %s %s", self.dom.name, event, data)  # QEMU repeats errors

    async def poll(self) -> None:
        """Fold query-block-jobs in; note whether the copy moves."""
        jobs = await self.mon.execute("query-block-jobs", timeout=QUERY_TIMEOUT_S)
        update_from_query(self.mirrors, jobs)
        now = time.monotonic()
        fig = figures(self.mirrors)
        self.bps = self.meter.update(fig["disk_processed"], now)
        if fig["disk_processed"] > self.best or fig["disk_remaining"] == 0:
            self.best, self.since = max(self.best, fig["disk_processed"]), now

    def progress(self) -> dict[str, int]:
        return {**figures(self.mirrors), "disk_bps": self.bps}

    def statistics(self) -> dict[str, int]:
        """The final figures: libvirt's disk_*, and ferry's disk_copy_ms (the bulk copy,
        mirrors started to all in sync)."""
        out = self.progress()
        if self.copy_ms:
            out["disk_copy_ms"] = self.copy_ms
            out["disk_bps"] = out["disk_processed"] * 1000 // self.copy_ms  # the average
        return out

    def check(self) -> None:
        """Raise if a mirror failed or the copy has not moved for the stall timeout; an
        abort first (cancelling the migration ends the dest, and so the mirrors)."""
        _check_aborted(self.dom)
        if (why := failure(self.mirrors)) is not None:
            raise MigrationError(why)
        if self.stall_s and time.monotonic() - self.since >= self.stall_s:
            raise MigrationError(f"the disk copy sent nothing for {self.stall_s:.0f}s "
                                 "(network to the dest cut?): cancelled")

    # -- phases -----------------------------------------------------------------------------
    async def start(self, host: str, port: int, speed: int) -> None:
        """An nbd node and a mirror per disk (libvirt's names: migration-<target>-storage,
        job drive-<alias>, export drive-<alias>)."""
        self.started_at = time.monotonic()
        for m in self.mirrors:
            node: dict[str, Any] = {
                "driver": "nbd", "node-name": m.node, "export": m.job,
                "server": {"type": "inet", "host": host, "port": str(port)},
                "read-only": False, "discard": "unmap", "detect-zeroes": "unmap"}
            if self.tls_creds:
                node.update({"tls-creds": self.tls_creds, "tls-hostname": host})
            await self.mon.execute("blockdev-add", node)
            self.nodes.append(m.node)
            await self.mon.execute("blockdev-mirror", {
                "job-id": m.job, "device": m.job, "target": m.node,
                "sync": "top" if self.inc else "full", "speed": speed,
                "auto-finalize": True, "auto-dismiss": True})
            self.started.append(m)
        self.since = time.monotonic()
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        """Figures while the RAM moves (the wait loop then belongs to qemu_migrate)."""
        while not self.closed.is_set():
            with contextlib.suppress(FerryError):
                await self.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), POLL_S)

    async def wait_ready(self, on_turn: Callable[[dict[str, int]], None]) -> None:
        """Until every mirror is READY (in sync); `on_turn` gets the figures each turn and
        may raise (an abort)."""
        while True:
            if not self.dom.active:
                raise MigrationError(f"QEMU of '{self.dom.name}' exited while copying disks")
            self.dom.wakeup.clear()
            await self.poll()
            self.check()
            on_turn(self.progress())
            if all(m.ready for m in self.mirrors):
                self.copy_ms = int((time.monotonic() - self.started_at) * 1000)
                return
            await nap(self.dom)

    async def wait_closed(self, within: float) -> bool:
        """Whether the copy ended (completed or aborted) within `within` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed.wait(), within)
        return self.closed.is_set()

    async def set_speed(self, speed: int) -> None:
        for m in self.started:
            if not m.ended:
                await self.mon.execute("block-job-set-speed", {"device": m.job, "speed": speed})

    async def complete(self) -> None:
        """At pre-switchover, the guest stopped: each mirror copies what is left and ends
        (a soft cancel of a READY mirror completes it without pivot)."""
        await self.set_speed(0)
        for m in self.started:
            await self.mon.execute("block-job-cancel", {"device": m.job, "force": False})
        self.since = time.monotonic()
        while not all(m.ended for m in self.started):
            self.dom.wakeup.clear()
            with contextlib.suppress(QemuError):
                await self.poll()
            self.check()
            await nap(self.dom)
        self.check()  # COMPLETED with an error is a failure
        await self._close()
        log.info("domain %s: disks copied (%s)", self.dom.name, self.progress())

    async def abort(self) -> None:
        """Best effort, bounded: mirrors cancelled, nbd nodes gone; the guest runs on."""
        try:
            await self._cancel_all()
            if not await self._ended_within(CANCEL_S):
                await self._yank()
                await self._ended_within(CANCEL_S)
        finally:
            await self._close()

    async def _cancel_all(self) -> None:
        for m in self.started:
            if not m.ended:
                with contextlib.suppress(FerryError):
                    await self.mon.execute("block-job-cancel", {"device": m.job, "force": True},
                                           timeout=CANCEL_S)

    async def _ended_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not all(m.ended for m in self.started):
            if time.monotonic() > deadline or not self.dom.active:
                return not self.dom.active
            self.dom.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dom.wakeup.wait(), POLL_S)
            with contextlib.suppress(FerryError):
                jobs = await self.mon.execute("query-block-jobs", timeout=1)
                for m in self.started:  # gone from the list: it ended (auto-dismiss)
                    if not any(j.get("device") == m.job for j in jobs):
                        m.ended = True
        return True

    async def _yank(self) -> None:
        """Out of band: answered even while a drain on a stalled dest holds QEMU's main
        loop; the nbd nodes' I/O fails at once and the mirrors end."""
        instances = [{"type": "block-node", "node-name": n} for n in self.nodes]
        if not instances or not self.dom.active:
            return
        log.warning("domain %s: mirrors did not stop, yanking %s", self.dom.name, self.nodes)
        with contextlib.suppress(FerryError):
            await self.mon.execute("yank", {"instances": instances}, timeout=5, oob=True)

    async def _close(self) -> None:
        self.closed.set()
        if self._poller is not None:
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        nodes, self.nodes = self.nodes, []
        if not self.dom.active:
            return
        for node in nodes:
            try:
                await self.mon.execute("blockdev-del", {"node-name": node}, timeout=10)
            except FerryError as exc:
                log.warning("domain %s: blockdev-del %s failed: %s", self.dom.name, node, exc)


async def cancel_leftovers(dom: DomainObj) -> None:
    """After a worker restart or a lost Perform: mirrors and nbd nodes a storage copy
    left in the source QEMU go (libvirt's qemuMigrationSrcCancelUnattended)."""
    if dom.monitor is None or not dom.active:
        return
    mon = dom.monitor
    try:
        jobs = await mon.execute("query-block-jobs", timeout=QUERY_TIMEOUT_S)
        for j in jobs:
            if j.get("type") == "mirror" and str(j.get("device", "")).startswith("drive-"):
                with contextlib.suppress(FerryError):
                    await mon.execute("block-job-cancel", {"device": j["device"],
                                                           "force": True})
        nodes = await mon.execute("query-named-block-nodes", {"flat": True},
                                  timeout=QUERY_TIMEOUT_S)
        for n in nodes:
            name = str(n.get("node-name", ""))
            if name.startswith("migration-") and name.endswith("-storage"):
                await _del_when_free(mon, name)
    except FerryError as exc:
        log.warning("domain %s: storage copy leftovers not cleaned: %s", dom.name, exc)


async def _del_when_free(mon: Monitor, node: str) -> None:
    deadline = time.monotonic() + CANCEL_S
    while True:
        try:
            await mon.execute("blockdev-del", {"node-name": node}, timeout=10)
            return
        except QemuError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(POLL_S)


async def copy_disks(agent: HostAgent, dom: DomainObj, st: MigrationState,
                     dest_cookie: Cookie | None, record: Callable[[dict[str, Any]], None],
                     tick: Callable[[float], None]) -> StorageCopy | None:
    """With a storage copy: mirror every disk to the dest's NBD exports and wait until
    all are in sync (the RAM goes after).  `record` gets the figures, `tick` the time
    since the start each turn (--timeout pauses a guest whose writes outrun the copy)."""
    p = st.params
    if not p.storage_copy:
        return None
    disks = disks_to_copy(dom.current, p.migrate_disks)
    port = check_dest_answer(disks, dest_cookie.nbd if dest_cookie else None)
    if not disks:
        return None
    job = dom.job
    assert job is not None and dom.monitor is not None
    copy = StorageCopy(dom, dom.monitor, disks, inc=p.storage_inc,
                       stall_s=agent.settings.migration_stall_timeout_s,
                       tls_creds=dom.tls_creds)  # set up with the RAM stream's (--tls)
    dom.storage_out = copy
    host = await _nbd_host(agent, st)
    bandwidth = job.bandwidth_mib_s if job.bandwidth_mib_s is not None else p.bandwidth_mib_s
    try:
        await copy.start(host, port, mib_to_speed(bandwidth))
    except QemuError as exc:  # a TLS handshake refused shows in the nbd blockdev-add
        told = _tls_failure(agent, st, exc) if copy.tls_creds else None
        if told is None:
            raise
        raise told from None
    await failpoints.hit("perform3.mirroring")

    def turn(figures: dict[str, int]) -> None:
        _check_aborted(dom)
        record({"status": "copying-disks", **figures})
        tick(time.monotonic() - copy.started_at)

    await copy.wait_ready(turn)
    log.info("domain %s: disks in sync (%s), migrating the RAM", dom.name, copy.progress())
    return copy


def at_switchover(dom: DomainObj, copy: StorageCopy) -> Callable[[], Awaitable[None]]:
    """At pre-switchover (the guest stopped): the mirrors complete; an abort that came
    meanwhile (QEMU then cancels the migration itself) ends the job here."""
    async def run() -> None:
        await failpoints.hit("perform3.switchover")
        _check_aborted(dom)
        await copy.complete()
        _check_aborted(dom)
    return run


def _tls_failure(agent: HostAgent, st: MigrationState, exc: QemuError) -> FerryError | None:
    """QEMU's words for an NBD connection refused in its TLS handshake, as ferry tells
    those of the RAM stream (workers/migration/tls.py)."""
    desc = exc.message.split("blockdev-add: ", 1)[-1]
    return tls.stream_failure(st.params, st.uri or "", desc, agent.settings.pki_dir / CA_FILE)


def _check_aborted(dom: DomainObj) -> None:
    if dom.job is not None and dom.job.abort:
        raise MigrationError("operation aborted: migration job canceled by client")


async def _nbd_host(agent: HostAgent, st: MigrationState) -> str:
    """Where the dest's NBD server listens: the host of the QEMU migration URI, as
    libvirt; for a unix: URI (same-machine tests), the dest's migration address."""
    scheme, host, _ = parse_qemu_uri(st.uri or "")
    if scheme == "tcp":
        return host
    dest = get_host(agent.redis, st.params.dest)
    if dest is None or not dest.get("address"):
        raise MigrationError(f"dest host '{st.params.dest}' has no migration address for NBD")
    return str(dest["address"])
