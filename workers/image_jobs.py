"""The image jobs on the agent loop: save, restore and dump, a guest's state to a file and back.

Save pauses the guest and hands QEMU, over SCM_RIGHTS (`getfd`, then
`migrate fd:NAME`), the write end of a pipe read by a compressor ferry spawns
itself (an argument list, never a shell), which writes behind the image header
(workers/image_format.py) into a temp file in the target's directory: fsync,
rename, and the guest is shutoff:saved.  Restore checks the header, starts QEMU with
`-incoming defer` and hands it the read end of a decompressor's pipe
(`migrate-incoming fd:NAME`).  Raw images need no helper: QEMU gets the file.
Dump hands QEMU the temp file for `dump-guest-memory`.  Temp files and
helper processes live in workers/image_stream.py.

Leases: the save's pause releases them, restore takes them before QEMU starts
(and gives them back when the guest stays paused), as `start` does.

Each is a job: the record shows progress (domjobinfo), and domjobabort stops
it: QEMU's migration is cancelled (save; "save" is one of the signal
handlers' PERFORM_PHASES), the load is stopped (restore), or the finished
dump is thrown away (QEMU cannot cancel a dump).  On any failure the temp
file goes, a saved guest runs again (`running:save_canceled` when ferry paused
it) and a restored one is not left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import time
import uuid as uuidlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from workers import failpoints, image_format
from workers.abi import check_abi_stability
from workers.agent import HostAgent
from workers.cpumodel import with_running_cpu
from workers.domain import DomainDef
from workers.domain_states import DomainState, PausedReason, RunningReason, ShutoffReason
from workers.domain_xml import format_domain_xml
from workers.domobj import DomainObj
from workers.errors import (
    FerryError,
    InvalidInputError,
    MigrationError,
    QemuError,
    UnsupportedError,
)
from workers.image_format import CompressorError, ImageError, ImageHeader, ImageIOError
from workers.image_stream import (
    Helper,
    TempImage,
    explain,
    not_a_disk,
    open_image,
    pipeline,
    require_programs,
    target_path,
)
from workers.job_types import JobOperation, Phase
from workers.jobs import ActiveJob
from workers.lifecycle import inactive_domain_for, launch, pause_cpus, run_cpus
from workers.migration import qemu_migrate, stream_caps
from workers.migration.progress import ProgressTracker
from workers.monitor import Monitor
from workers.process import log_tail

log = logging.getLogger(__name__)

FD_NAME = "ferry-image"
LOAD_QUERY_TIMEOUT_S = 600.0  # QEMU answers no QMP while it loads a raw image from a file


# -- jobs ----------------------------------------------------------------------------------
def _start_job(agent: HostAgent, dom: DomainObj, operation: JobOperation, job_id: str | None,
               flags: int) -> ActiveJob:
    job_id = job_id or str(uuidlib.uuid4())
    phase = Phase(operation.value)  # an image job has one phase, named as its operation
    agent.jobs.start(dom.uuid, job_id=job_id, kind=operation.kind, phase=phase,
                     source=agent.host, dest=None, flags=flags)
    dom.job = ActiveJob(job_id, operation, phase, time.time(), source=agent.host,
                        flags=flags)
    return dom.job


async def _end_job(agent: HostAgent, dom: DomainObj, uuid: str, job: ActiveJob,
                   error: BaseException | None, stats: dict[str, Any] | None = None) -> None:
    if dom.job is job:
        dom.job = None
    await agent.signals.unwatch(uuid)
    err = None
    if error is not None:
        err = error.to_dict() if isinstance(error, FerryError) else \
            {"type": type(error).__name__, "message": str(error) or type(error).__name__}
    info = {"id": job.id, "operation": job.operation, "source": agent.host, "dest": None,
            "type": "failed" if error is not None else "completed",
            "time_elapsed_ms": int((time.time() - job.started) * 1000),
            "statistics": stats if stats is not None else job.progress, "error": err}
    agent.jobs.complete(uuid, agent.host, info)
    if err is not None:
        agent.jobs.set_error(uuid, job.id, err)
    agent.jobs.end(uuid, job.id)


def _aborted(what: str) -> MigrationError:
    return MigrationError(f"operation aborted: {what} job canceled by client")


def _lock_dom(dom: DomainObj, op: str) -> None:
    dom.require_active(op)
    dom.require_state(op, DomainState.RUNNING, DomainState.PAUSED)
    dom.require_no_job(op)


async def _hand_fd(mon: Monitor, fd: int) -> None:
    """Give QEMU `fd` as FD_NAME (SCM_RIGHTS); our copy is closed either way."""
    try:
        mon.send_fd(fd)
        await mon.execute("getfd", {"fdname": FD_NAME})
    finally:
        os.close(fd)


async def _drop_fd(dom: DomainObj) -> None:
    """QEMU takes the named fd when a command uses it; one left over would keep a pipe open."""
    if dom.monitor is not None:
        with contextlib.suppress(QemuError):
            await dom.monitor.execute("closefd", {"fdname": FD_NAME}, timeout=5)


# -- save ----------------------------------------------------------------------------------
async def save(agent: HostAgent, name: str, path: str, *, compression: str = "raw",
               running: bool = False, paused: bool = False, bypass_cache: bool = False,
               job_id: str | None = None) -> dict[str, Any]:
    """Save `name` to `path`: afterwards it is shutoff:saved and the image complete."""
    image_format.check_run_flags(running, paused)
    comp = image_format.compressor(compression)
    stages = [image_format.compress_argv(comp.name, failpoints.extra_argv("save.compressor"))]
    if bypass_cache:
        stages.append(image_format.bypass_cache_argv())
    real = [s for s in stages if s]
    require_programs(real)
    target = target_path(path, agent.allowed)
    dom = agent.lookup(name)
    not_a_disk(dom.current, target)
    flags = sum(int(flag) for flag, on in ((image_format.SaveFlags.BYPASS_CACHE, bypass_cache),
                                           (image_format.SaveFlags.RUNNING, running),
                                           (image_format.SaveFlags.PAUSED, paused)) if on)
    async with dom.lock:
        _lock_dom(dom, "save")
        job = _start_job(agent, dom, JobOperation.SAVE, job_id, flags)
    uuid = dom.uuid
    was_running = dom.state == DomainState.RUNNING
    header = ImageHeader(format_domain_xml(dom.current, migratable=True), comp.name,
                         running or (was_running and not paused))
    run = _SaveRun(agent, dom, job, target, header, real)
    try:
        await agent.signals.watch(uuid)
        stats = await run.run()
    except BaseException as exc:
        err = await run.undo(exc)
        await _end_job(agent, dom, uuid, job, err)
        if err is exc:
            raise
        raise err from exc
    try:
        agent.release_leases(dom)  # already, when the save paused it; QEMU's exit would too
        await agent.kill(dom, ShutoffReason.SAVED)
    finally:
        await _end_job(agent, dom, uuid, job, None, stats)
    log.info("domain %s saved to %s (%s, %d bytes)", name, target, comp.name, run.size)
    return {**dom.info(agent.host), "path": str(target), "compression": comp.name,
            "size": run.size, "was_running": header.was_running, "job_id": job.id,
            "statistics": stats}


@dataclass
class _SaveRun:
    agent: HostAgent
    dom: DomainObj
    job: ActiveJob
    target: Path
    header: ImageHeader
    stages: list[list[str]]
    image: TempImage | None = None
    helpers: list[Helper] = field(default_factory=list)
    paused_by_us: bool = False
    migrating: bool = False
    size: int = 0
    tracker: ProgressTracker = field(default_factory=ProgressTracker)

    async def run(self) -> dict[str, Any]:
        agent, dom = self.agent, self.dom
        self.image = TempImage(self.target, self.agent.allowed)
        self.image.write(image_format.encode_header(self.header), 0)
        writer = self.image.writer_fd(self.header.data_offset)
        try:
            qemu_fd, self.helpers = await pipeline(self.stages, writer, writing=True)
        finally:
            os.close(writer)
        try:
            if dom.state == DomainState.RUNNING:
                await pause_cpus(agent, dom, PausedReason.SAVE)
                self.paused_by_us = True
            mon = dom.require_monitor("save")
            await _outgoing_setup(mon, self.job.bandwidth_mib_s)
            await failpoints.hit("save.before_migrate")
            self._tick(0.0)
        except BaseException:
            os.close(qemu_fd)
            raise
        await _hand_fd(mon, qemu_fd)
        started_ms = int(time.time() * 1000)
        self.migrating = True
        await mon.execute("migrate", {"uri": f"fd:{FD_NAME}"})
        info = await qemu_migrate.wait(dom, mon, started_ms=started_ms,
                                       on_progress=self._progress, on_tick=self._tick)
        self.migrating = False
        for h in self.helpers:
            await h.finish()
        return await self._complete(info, started_ms)

    async def _complete(self, info: dict[str, Any], started_ms: int) -> dict[str, Any]:
        assert self.image is not None
        data_len = self.image.size() - self.header.data_offset
        if data_len <= 0:
            raise ImageIOError(f"nothing was written to {self.image.tmp}")
        self.header = replace(self.header, data_len=data_len)
        self.image.write(image_format.encode_header(self.header), 0)
        await self.image.commit()
        self.size = self.header.data_offset + data_len
        stats = qemu_migrate.progress_of(info, started_ms)
        stats.pop("status", None)
        return stats

    def _progress(self, stats: dict[str, Any]) -> None:
        if stats:
            self.job.progress = self.tracker.update(stats, time.monotonic())
            self.agent.jobs.set_progress(self.dom.uuid, self.job.id, self.job.progress)

    def _tick(self, elapsed: float) -> None:
        if self.job.abort or self.agent.jobs.abort_requested(self.dom.uuid, self.job.id):
            raise _aborted("save")
        if any(h.failed for h in self.helpers):
            raise CompressorError("the compressor exited during the save")

    async def undo(self, exc: BaseException) -> BaseException:
        """Back to before the save: no migration, no helpers, no temp file, guest running."""
        dom = self.dom
        if self.migrating and dom.active:
            await qemu_migrate.cancel(dom)
            await _until_migration_stops(dom)
        await _drop_fd(dom)
        err = _aborted("save") if self.job.abort else await explain(self.helpers, exc)
        if isinstance(err, MigrationError) and err.message.startswith("migration failed: "):
            err = MigrationError(f"QEMU could not write the image: "
                                 f"{err.message.removeprefix('migration failed: ')}")
        for h in self.helpers:
            await h.kill()
        if self.image is not None:
            self.image.discard()
        if self.paused_by_us and dom.active:
            try:
                await run_cpus(self.agent, dom, RunningReason.SAVE_CANCELED)
            except FerryError as resume_exc:
                log.error("domain %s: cannot resume after the failed save: %s", dom.name,
                          resume_exc)
        log.warning("domain %s: save to %s failed: %s", dom.name, self.target, err)
        return err


async def _outgoing_setup(mon: Monitor, bandwidth_mib_s: int | None) -> None:
    caps = stream_caps.as_qmp(stream_caps.file_capabilities())
    await mon.execute("migrate-set-capabilities", {"capabilities": caps})
    # tls-creds reset: a QEMU that migrated in with TLS would look for its object
    await mon.execute("migrate-set-parameters",
                      {"max-bandwidth": qemu_migrate.mib_to_bytes(bandwidth_mib_s or 0),
                       "tls-creds": "", "tls-hostname": ""})


async def _until_migration_stops(dom: DomainObj, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while dom.active and dom.monitor is not None and time.monotonic() < deadline:
        with contextlib.suppress(QemuError):
            status = (await dom.monitor.execute("query-migrate")).get("status")
            if status not in qemu_migrate.ACTIVE:
                return
        dom.wakeup.clear()
        await qemu_migrate.nap(dom)


# -- restore -------------------------------------------------------------------------------
async def restore(agent: HostAgent, path: str, *, xml: str | None = None,
                  running: bool = False, paused: bool = False,
                  job_id: str | None = None) -> dict[str, Any]:
    """Start the guest saved in `path`: running:restored, or paused:user as asked or saved."""
    image_format.check_run_flags(running, paused)
    fd = open_image(path, agent.allowed)
    try:
        header = _read_header(fd)
        definition = _restore_definition(agent, header, xml)
        argv = image_format.decompress_argv(header.compression)
        stages = [argv] if argv else []
        require_programs(stages)
        return await _restore(agent, fd, header, definition, stages,
                              image_format.starts_running(header, running, paused), job_id)
    finally:
        os.close(fd)


def _read_header(fd: int) -> ImageHeader:
    size = os.fstat(fd).st_size
    with io.FileIO(fd, "rb", closefd=False) as f:
        header = image_format.read_header(f, size)
    if size > header.data_offset + header.data_len:
        raise ImageError(f"image is corrupted: {size - header.data_offset - header.data_len} "
                         "bytes after the end its header gives")
    os.lseek(fd, header.data_offset, os.SEEK_SET)
    return header


def _restore_definition(agent: HostAgent, header: ImageHeader, xml: str | None) -> DomainDef:
    """The saved definition (checked as any user XML), or `xml` if its ABI matches."""
    try:
        saved = agent.parse(header.xml)
    except InvalidInputError as exc:
        raise ImageError(f"the domain XML in the image is refused: {exc.message}") from None
    if xml is None:
        return saved
    chosen = with_running_cpu(agent.parse(xml), saved)
    check_abi_stability(saved, chosen)
    return chosen


def _restore_dom(agent: HostAgent, d: DomainDef) -> tuple[DomainObj, bool]:
    """The object the restored guest lives in (an inactive definition of it, or new)."""
    dom = inactive_domain_for(agent, d, "restore")
    return (DomainObj(definition=None, live=d), True) if dom is None else (dom, False)


async def _restore(agent: HostAgent, fd: int, header: ImageHeader, definition: DomainDef,
                   stages: list[list[str]], start: bool, job_id: str | None) -> dict[str, Any]:
    dom, created = _restore_dom(agent, definition)
    async with dom.lock:
        dom.require_inactive("restore")
        agent.domains[definition.name] = dom
        job = _start_job(agent, dom, JobOperation.RESTORE, job_id, 0)
    uuid = dom.uuid
    run = _RestoreRun(agent, dom, job, fd, header, stages)
    try:
        await agent.signals.watch(uuid)
        dom.live = definition  # the leases are those of the disks it will open
        agent.acquire_leases(dom)  # every lease or nothing starts, as `start`
        await run.run(definition)
        if start:
            await run_cpus(agent, dom, RunningReason.RESTORED)
        else:
            agent.set_state(dom, DomainState.PAUSED, PausedReason.USER)
            agent.release_leases(dom)
    except BaseException as exc:
        err = await run.undo(exc, created)
        await _end_job(agent, dom, uuid, job, err)
        if err is exc:
            raise
        raise err from exc
    await _end_job(agent, dom, uuid, job, None)
    log.info("domain %s restored from an image (%s)", dom.name, header.compression)
    return {**dom.info(agent.host), "job_id": job.id, "compression": header.compression,
            "was_running": header.was_running}


@dataclass
class _RestoreRun:
    agent: HostAgent
    dom: DomainObj
    job: ActiveJob
    fd: int
    header: ImageHeader
    stages: list[list[str]]
    helpers: list[Helper] = field(default_factory=list)

    async def run(self, definition: DomainDef) -> None:
        agent, dom = self.agent, self.dom
        await launch(agent, dom, definition, incoming="defer")
        mon = dom.require_monitor("restore")
        await mon.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": "events", "state": True}]})
        qemu_fd, self.helpers = await pipeline(self.stages, self.fd, writing=False)
        await _hand_fd(mon, qemu_fd)
        await mon.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
        await self._wait(mon)
        for h in self.helpers:
            await h.finish()

    async def _wait(self, mon: Monitor) -> None:
        dom = self.dom
        while True:
            if not dom.active:
                raise QemuError("QEMU exited while loading the image",
                                cause=log_tail(self.agent.store.qemu_log(dom.name)) or None)
            dom.wakeup.clear()
            try:
                status = (await mon.execute("query-migrate", timeout=LOAD_QUERY_TIMEOUT_S)
                          ).get("status")
            except QemuError:
                if await dom.gone_within():
                    continue  # the top of the loop says so, with QEMU's last words
                raise
            self._progress()
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QemuError(f"loading the image {status}")
            if self.job.abort or self.agent.jobs.abort_requested(dom.uuid, self.job.id):
                raise _aborted("restore")
            if any(h.failed for h in self.helpers):
                raise CompressorError("the decompressor exited during the restore")
            await qemu_migrate.nap(dom)

    def _progress(self) -> None:
        """Bytes of the image read so far: QEMU and the decompressor share our file offset."""
        with contextlib.suppress(OSError):
            done = max(0, os.lseek(self.fd, 0, os.SEEK_CUR) - self.header.data_offset)
            total = self.header.data_len
            self.job.progress = {"memory_total": total, "memory_processed": min(done, total),
                                 "memory_remaining": max(0, total - done)}
            self.agent.jobs.set_progress(self.dom.uuid, self.job.id, self.job.progress)

    async def undo(self, exc: BaseException, created: bool) -> BaseException:
        """Nothing started: the new QEMU and the helpers are gone, a new object forgotten."""
        agent, dom = self.agent, self.dom
        if dom.active:  # first: a decompressor QEMU no longer reads from dies of SIGPIPE
            await agent.kill(dom, ShutoffReason.FAILED)
        err = _aborted("restore") if self.job.abort else await explain(self.helpers, exc)
        for h in self.helpers:
            await h.kill()
        agent.release_ports(dom)
        try:
            agent.release_leases(dom)  # when QEMU never started; its exit releases them
        except Exception as lease_exc:  # they expire anyway once nobody renews them
            log.error("domain %s: releasing leases failed: %s", dom.name, lease_exc)
        if dom.persistent and not dom.active:
            dom.live = None
        if created and not dom.active and agent.domains.get(dom.name) is dom:
            agent.domains.pop(dom.name)
        log.warning("domain %s: restore failed: %s", dom.name, err)
        return err


# -- dump ----------------------------------------------------------------------------------
async def dump(agent: HostAgent, name: str, path: str, *, memory_only: bool = False,
               format: str = "elf", live: bool = False,
               job_id: str | None = None) -> dict[str, Any]:
    """Guest memory to `path` with dump-guest-memory; the guest runs on afterwards."""
    request = image_format.dump_request(memory_only, format)
    target = target_path(path, agent.allowed)
    dom = agent.lookup(name)
    not_a_disk(dom.current, target)
    flags = (int(image_format.DumpFlags.LIVE) if live else 0) | \
        (int(image_format.DumpFlags.MEMORY_ONLY) if memory_only else 0)
    async with dom.lock:
        _lock_dom(dom, "dump")
        job = _start_job(agent, dom, JobOperation.DUMP, job_id, flags)
    uuid = dom.uuid
    run = _DumpRun(agent, dom, job, target, request, live)
    try:
        await agent.signals.watch(uuid)
        await run.run()
    except BaseException as exc:
        if run.image is not None:
            run.image.discard()
        await _drop_fd(dom)
        await run.resume()
        await _end_job(agent, dom, uuid, job, exc)
        raise
    await run.resume()
    await _end_job(agent, dom, uuid, job, None)
    return {**dom.info(agent.host), "path": str(target), "format": format,
            "memory_only": memory_only, "size": run.size, "job_id": job.id}


@dataclass
class _DumpRun:
    agent: HostAgent
    dom: DomainObj
    job: ActiveJob
    target: Path
    request: dict[str, object]
    live: bool
    image: TempImage | None = None
    paused_by_us: bool = False
    size: int = 0

    async def run(self) -> None:
        agent, dom = self.agent, self.dom
        mon = dom.require_monitor("dump")
        await _check_dump_format(mon, str(self.request["format"]))
        self.image = TempImage(self.target, self.agent.allowed)
        if dom.state == DomainState.RUNNING:
            if self.live:  # QEMU stops the vCPUs itself while it dumps
                dom.expected_pause = PausedReason.DUMP
                reason = dom.reason
                dom.expected_resume = reason if isinstance(reason, RunningReason) \
                    else RunningReason.UNPAUSED
            else:
                await pause_cpus(agent, dom, PausedReason.DUMP)
                self.paused_by_us = True
        await _hand_fd(mon, self.image.writer_fd(0))
        await mon.execute("dump-guest-memory", {"protocol": f"fd:{FD_NAME}", **self.request})
        await self._wait(mon)
        if self.job.abort or agent.jobs.abort_requested(dom.uuid, self.job.id):
            raise _aborted("dump")
        self.size = self.image.size()
        await self.image.commit()

    async def _wait(self, mon: Monitor) -> None:
        dom = self.dom
        while True:
            if not dom.active:
                raise QemuError("QEMU exited during the dump",
                                cause=log_tail(self.agent.store.qemu_log(dom.name)) or None)
            try:
                info = await mon.execute("query-dump")
            except QemuError:
                if await dom.gone_within():
                    continue
                raise
            total, done = int(info.get("total") or 0), int(info.get("completed") or 0)
            self.job.progress = {"memory_total": total, "memory_processed": done,
                                 "memory_remaining": max(0, total - done)}
            self.agent.jobs.set_progress(dom.uuid, self.job.id, self.job.progress)
            if info.get("status") == "completed":
                return
            if info.get("status") == "failed":
                raise QemuError("QEMU failed to write the dump",
                                cause=log_tail(self.agent.store.qemu_log(dom.name)) or None)
            await qemu_migrate.nap(dom)

    async def resume(self) -> None:
        """The guest runs as before: resumed if ferry paused it, QEMU's own resume awaited."""
        dom = self.dom
        try:
            if self.paused_by_us and dom.active and dom.state == DomainState.PAUSED:
                await run_cpus(self.agent, dom, RunningReason.UNPAUSED)
            elif self.live and dom.expected_resume is not None:
                deadline = time.monotonic() + 5
                while dom.active and dom.state != DomainState.RUNNING and \
                        time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
        except FerryError as exc:
            log.error("domain %s: cannot resume after the dump: %s", dom.name, exc)
        finally:
            dom.expected_pause = dom.expected_resume = None


async def _check_dump_format(mon: Monitor, fmt: str) -> None:
    caps = await mon.execute("query-dump-guest-memory-capability")
    formats = [str(f) for f in caps.get("formats", [])]
    if fmt not in formats:
        raise UnsupportedError(f"this QEMU cannot write {fmt} dumps (it can: "
                               f"{', '.join(formats)})")


__all__ = ["dump", "restore", "save", "target_path"]
