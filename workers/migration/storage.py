"""Storage copy on the source: the disks go to the dest's NBD exports by QEMU block jobs.

The bulk copy is a blockdev-backup with a dirty bitmap per disk, then backup rounds of
what the guest wrote meanwhile, then (the guest paused for a last small round) a
`sync: none` mirror that copies every write from there on: an interrupted copy
leaves the bitmap behind, and a retry to the same dest copies only what it holds
(storage_resume.py).  Each backup reads a local snapshot (image fleecing,
storage_fleece.py), so a guest write never waits on, nor fails with, the dest.
From the mirror on, libvirt's order (qemuMigrationSrcRun),
which QEMU 7.2 needs: mirrors start before `migrate`, every mirror READY, `migrate` with
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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from workers import confine, failpoints
from workers.abi import check_abi_stability
from workers.agent import HostAgent
from workers.cpumodel import with_running_cpu
from workers.domain import Disk
from workers.domain_states import DomainState, PausedReason, RunningReason
from workers.domain_xml import format_domain_xml
from workers.domobj import DomainObj
from workers.errors import FerryError, MigrationError, QemuError
from workers.heartbeat import get_host
from workers.migration import tls
from workers.migration.chain_state import MigrationState
from workers.migration.cookie import Cookie, CookieNbd
from workers.migration.params import MigrationParams, parse_qemu_uri
from workers.migration.qemu_migrate import nap
from workers.migration.storage_fleece import ROUND, Fleece, fleece_path, remove_leftovers
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
from workers.migration.storage_resume import (
    bitmap_name,
    held_attempt,
    node_bitmaps,
    resumable,
    should_hand_over,
)
from workers.monitor import Monitor
from workers.pki import CA_FILE

log = logging.getLogger(__name__)

POLL_S = 0.25
CANCEL_S = 5.0  # how long a forced cancel may take before the nodes are yanked
QUERY_TIMEOUT_S = 10.0


async def begin_nbd(dom: DomainObj, p: MigrationParams, host: str,
                    resumable: bool = False) -> CookieNbd:
    """Begin's <nbd> section: every disk to copy, checked, with its image's facts; if
    resumable, the attempt whose bitmap the disk has or will have (`resume`)."""
    disks = disks_to_copy(dom.current, p.migrate_disks)
    for disk in disks:
        assert disk.source is not None
        if not os.path.exists(disk.source):
            raise MigrationError(f"disk {disk.target}: its image {disk.source} does not exist "
                                 f"on host {host}")
    mon = dom.require_monitor("copy storage")
    blocks = await mon.execute("query-block")
    return CookieNbd(0, tuple(
        replace(nbd_disk(d, block_entry(blocks, d), p.storage_inc),
                resume=(held_attempt(node_bitmaps(blocks, d.drive_id)[1]) or p.job_id)
                if resumable else None) for d in disks))


async def dry_run(agent: HostAgent, p: MigrationParams) -> dict[str, Any]:
    """Begin's checks without a job: the guest can move, the definition the dest would
    get (`--xml` checked for ABI stability), and the disks a storage copy would send."""
    dom = agent.lookup(p.domain)
    dom.require_active("migrate")
    dom.require_state("migrate", DomainState.RUNNING, DomainState.PAUSED)
    dom.require_no_job("migrate")
    chosen = dom.current
    if p.xmlin:
        chosen = with_running_cpu(agent.parse(p.xmlin), dom.current)
        check_abi_stability(dom.current, chosen)
    nbd = await begin_nbd(dom, p, agent.host) if p.storage_copy else CookieNbd()
    return {"host": agent.host, "xml": format_domain_xml(chosen, migratable=True),
            "disks": [asdict(d) for d in nbd.disks],
            "sources": {d.target: d.source for d in dom.current.disks}}


def copies_resumably(agent: HostAgent, p: MigrationParams) -> bool:
    """Whether this copy runs as backup rounds with a bitmap a retry can continue: with
    FERRY_STORAGE_RESUMABLE (the default), for --copy-storage-all only (a `sync: top`
    backup's bitmap after a failure was not shown to hold every cluster left, so inc
    copies in full by the mirror)."""
    return agent.settings.storage_resumable and not p.storage_inc


def mib_to_speed(mib: int | None) -> int:
    """A bandwidth in MiB/s as a block job speed (bytes/s; 0 is unlimited, as for QEMU)."""
    return (mib or 0) << 20


class StorageCopy:
    """The block jobs of one outgoing migration (backup rounds, then a mirror per disk),
    from start to completion or abort."""

    def __init__(self, dom: DomainObj, mon: Monitor, disks: list[Disk], *, inc: bool,
                 stall_s: float, tls_creds: str | None = None,
                 resumable: bool = False, state_dir: Path | None = None,
                 owner: tuple[int, int] | None = None) -> None:
        self.dom, self.mon, self.inc = dom, mon, inc
        self.owner = owner  # of the fleecing files: a confined QEMU's (uid, gid)
        self.resumable = resumable  # backup rounds with a bitmap first, else mirrors only
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
        self.speed = 0
        self.fmt: dict[str, str] = {}  # target -> format node (bitmaps, jobs' device)
        self.bitmaps: dict[str, str] = {}  # target -> its dirty bitmap
        self.qdev: dict[str, str] = {}  # target -> its device's QOM path
        self.size: dict[str, int] = {}  # target -> virtual size
        self.fleeces: dict[str, Fleece] = {}  # target -> the running round's snapshot
        self.state_dir = state_dir or Path("/var/lib/ferry")
        self.reused = 0  # bytes a retry found on the dest already
        self.rounds = 0
        self.handover_ms: int | None = None  # the guest's pause to start the mirrors
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
        if self.handover_ms is not None:
            out["disk_handover_ms"] = self.handover_ms
        if self.reused:
            out["disk_reused"] = self.reused
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
    async def start(self, host: str, port: int, speed: int, attempt: str,
                    answered: dict[str, str | None]) -> None:
        """An nbd node per disk (libvirt's name: migration-<target>-storage, export
        drive-<alias>) and its bulk copy: a backup into it (job drive-<alias>) that fills
        a dirty bitmap, or, where the dest kept this bitmap's attempt (`answered`), a
        round of what the bitmap holds."""
        self.started_at = time.monotonic()
        self.speed = speed
        if self.resumable:  # a round a worker restart cut: its snapshot goes first
            await remove_leftovers(self.mon, self.state_dir, self.dom.uuid)
        blocks = await self.mon.execute("query-block")
        for m in self.mirrors:
            node: dict[str, Any] = {
                "driver": "nbd", "node-name": m.node, "export": m.job,
                "server": {"type": "inet", "host": host, "port": str(port)},
                "read-only": False, "discard": "unmap", "detect-zeroes": "unmap"}
            if self.tls_creds:
                node.update({"tls-creds": self.tls_creds, "tls-hostname": host})
            await self.mon.execute("blockdev-add", node)
            self.nodes.append(m.node)
            if self.resumable:
                await self._first_job(m, blocks, attempt, answered.get(m.target))
            else:
                await self.mon.execute("blockdev-mirror", {
                    "job-id": m.job, "device": m.job, "target": m.node,
                    "sync": "top" if self.inc else "full", "speed": speed,
                    "auto-finalize": True, "auto-dismiss": True})
            self.started.append(m)
        self.since = time.monotonic()
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _first_job(self, m: MirrorState, blocks: Any, attempt: str,
                         answered: str | None) -> None:
        fmt, maps = node_bitmaps(blocks, m.job)
        if not fmt:
            raise MigrationError(f"disk {m.target} has no block node in QEMU")
        self.fmt[m.target] = fmt
        entry = block_entry(blocks, self.disks[m.target])
        self.qdev[m.target] = str(entry.get("qdev") or "")
        size = self.size[m.target] = int(entry["inserted"]["image"].get("virtual-size") or 0)
        held = held_attempt(maps)
        if resumable(held, answered, maps):
            assert held is not None
            self.bitmaps[m.target] = bitmap_name(held)
            self.reused += max(size - maps[bitmap_name(held)], 0)
            log.info("domain %s: disk %s continues copy %s (%d bytes left)", self.dom.name,
                     m.target, held, maps[bitmap_name(held)])
            await self._round(m, self.speed)
            return
        for name in maps:  # another attempt's, or the dest kept nothing: start afresh
            await self.mon.execute("block-dirty-bitmap-remove", {"node": fmt, "name": name})
        self.bitmaps[m.target] = bitmap_name(attempt)
        await self.mon.execute("block-dirty-bitmap-add", {
            "node": fmt, "name": self.bitmaps[m.target], "persistent": False})
        await self._backup(m, "top" if self.inc else "full", self.speed)

    def _job_args(self, m: MirrorState, speed: int) -> dict[str, Any]:
        return {"job-id": m.job, "device": self.fmt[m.target], "target": m.node,
                "speed": speed, "auto-finalize": True, "auto-dismiss": True}

    async def _round(self, m: MirrorState, speed: int) -> None:
        """Copy what the disk's bitmap holds; the bitmap then holds what the guest wrote
        meanwhile (and, should the round fail, what it did not copy too)."""
        await self._backup(m, "bitmap", speed)

    async def _backup(self, m: MirrorState, sync: str, speed: int) -> None:
        """A backup job from a fresh local snapshot of the disk (storage_fleece.py)."""
        t = m.target
        fleece = self.fleeces[t] = Fleece(
            self.mon, fmt=self.fmt[t], qdev=self.qdev[t], bitmap=self.bitmaps[t],
            size=self.size[t], path=fleece_path(self.state_dir, self.dom.uuid, t), target=t,
            owner=self.owner)
        try:
            source = await fleece.start()
            await self.mon.execute("blockdev-backup", {
                **self._job_args(m, speed), "device": source, "sync": sync,
                "bitmap": ROUND, "bitmap-mode": "always"})
        except FerryError:
            with contextlib.suppress(FerryError):  # logged; the first error is the one
                await self._drop_fleeces()
            raise

    async def _drop_fleeces(self) -> None:
        """The rounds' jobs ended: their snapshots go (what a job did not copy goes back
        into its disk's bitmap first)."""
        errors = []
        for target in list(self.fleeces):
            try:
                await self.fleeces.pop(target).stop()
            except FerryError as exc:
                log.warning("domain %s: disk %s: %s", self.dom.name, target, exc)
                errors.append(exc)
        if errors:
            raise errors[0]

    async def dirty(self) -> dict[str, int]:
        """Bytes each disk's bitmap holds (what the dest lacks, or may)."""
        blocks = await self.mon.execute("query-block", timeout=QUERY_TIMEOUT_S)
        out = {}
        for m in self.mirrors:
            _, maps = node_bitmaps(blocks, m.job)
            if self.bitmaps[m.target] not in maps:
                raise MigrationError(f"disk {m.target}: its dirty bitmap "
                                     f"{self.bitmaps[m.target]} went away")
            out[m.target] = maps[self.bitmaps[m.target]]
        return out

    async def _poll_forever(self) -> None:
        """Figures while the RAM moves (the wait loop then belongs to qemu_migrate)."""
        while not self.closed.is_set():
            with contextlib.suppress(FerryError):
                await self.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), POLL_S)

    async def wait_ready(self, on_turn: Callable[[dict[str, int]], None]) -> None:
        """The bulk copy, rounds until the bitmaps are small or stop shrinking, then the
        mirrors take over; `on_turn` gets the figures each turn and may raise (an abort).
        Without FERRY_STORAGE_RESUMABLE: until the mirrors are READY."""
        if not self.resumable:
            await self._wait_jobs(on_turn, lambda m: m.ready)
            self.copy_ms = int((time.monotonic() - self.started_at) * 1000)
            return
        await self._wait_jobs(on_turn, lambda m: m.ended)
        await self._drop_fleeces()
        history = [sum((await self.dirty()).values())]
        while not should_hand_over(history, self.rounds):
            await self._rounds(self.speed)
            await self._wait_jobs(on_turn, lambda m: m.ended)
            await self._drop_fleeces()
            self.rounds += 1
            history.append(sum((await self.dirty()).values()))
        await self._hand_over(on_turn)
        await self._wait_jobs(on_turn, lambda m: m.ready)
        self.copy_ms = int((time.monotonic() - self.started_at) * 1000)

    async def _rounds(self, speed: int) -> None:
        for target, count in (await self.dirty()).items():
            m = next(m for m in self.mirrors if m.target == target)
            if count:
                m.next_job()
                await self._round(m, speed)

    async def _wait_jobs(self, on_turn: Callable[[dict[str, int]], None],
                         done: Callable[[MirrorState], bool]) -> None:
        while True:
            if not self.dom.active:
                raise MigrationError(f"QEMU of '{self.dom.name}' exited while copying disks")
            self.dom.wakeup.clear()
            await self.poll()
            self.check()
            on_turn(self.progress())
            if all(done(m) for m in self.mirrors):
                return
            await nap(self.dom)

    async def _hand_over(self, on_turn: Callable[[dict[str, int]], None]) -> None:
        """A backup and a mirror cannot share a node: the guest pauses for a last
        round at full speed and the start of a `sync: none` mirror per disk (which
        copies every write from then on), then runs on."""
        running = bool((await self.mon.execute("query-status")).get("running"))
        reason = self.dom.reason
        started = time.monotonic()
        if running:
            self.dom.expected_pause = PausedReason.MIGRATION
            await self.mon.execute("stop")
        try:
            await self._rounds(0)
            await self._wait_jobs(on_turn, lambda m: m.ended)
            await self._drop_fleeces()
            for m in self.mirrors:
                m.next_job()
                await self.mon.execute("blockdev-mirror", {
                    **self._job_args(m, self.speed), "sync": "none"})
        finally:
            if running and self.dom.active:
                self.dom.expected_resume = reason if isinstance(reason, RunningReason) \
                    else RunningReason.UNPAUSED
                try:
                    await self.mon.execute("cont")
                finally:
                    self.dom.expected_resume = None
        self.handover_ms = int((time.monotonic() - started) * 1000)
        log.info("domain %s: mirrors took over after %d round(s), guest paused %d ms",
                 self.dom.name, self.rounds, self.handover_ms)

    async def wait_closed(self, within: float) -> bool:
        """Whether the copy ended (completed or aborted) within `within` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed.wait(), within)
        return self.closed.is_set()

    async def set_speed(self, speed: int) -> None:
        self.speed = speed
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
            try:
                if self.dom.active:
                    await self._drop_fleeces()
            except FerryError:
                pass  # logged; the bitmap then went, so a retry copies everything
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


async def cancel_leftovers(dom: DomainObj, state_dir: Path) -> None:
    """After a worker restart or a lost Perform: mirrors, backup rounds' snapshots and
    nbd nodes a storage copy left in the source QEMU go (libvirt's
    qemuMigrationSrcCancelUnattended)."""
    if dom.monitor is None or not dom.active:
        return
    mon = dom.monitor
    try:
        jobs = await mon.execute("query-block-jobs", timeout=QUERY_TIMEOUT_S)
        for j in jobs:
            if j.get("type") in ("mirror", "backup") and \
                    str(j.get("device", "")).startswith("drive-"):
                with contextlib.suppress(FerryError):
                    await mon.execute("block-job-cancel", {"device": j["device"],
                                                           "force": True})
        await remove_leftovers(mon, state_dir, dom.uuid)
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
                       resumable=copies_resumably(agent, p),
                       state_dir=agent.settings.state_dir,
                       owner=confine.owner(agent.confinement),
                       tls_creds=dom.tls_creds)  # set up with the RAM stream's (--tls)
    dom.storage_out = copy
    host = await _nbd_host(agent, st)
    bandwidth = job.bandwidth_mib_s if job.bandwidth_mib_s is not None else p.bandwidth_mib_s
    assert dest_cookie is not None and dest_cookie.nbd is not None
    try:
        await copy.start(host, port, mib_to_speed(bandwidth), p.job_id,
                         {d.target: d.resume for d in dest_cookie.nbd.disks})
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
