"""The host agent: owns this host's QEMU processes, monitors and state.

One asyncio loop thread owns every monitor, pidfd and DomainObj; Celery
task threads hand it coroutines with `call()`.  So state changes never race,
QMP events update state whenever they arrive, and a process exit is seen
the moment it happens, with or without a task running.  The services that
run beside it on its loop (the job-signal listener, the sweeper) are wired
by workers/host.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from config import broker
from config.settings import Settings
from workers import confine, dac, locks, netdev
from workers.domain import DomainDef
from workers.domain_states import (
    DomainState,
    PausedReason,
    Reason,
    RunningReason,
    ShutoffReason,
    parse_reason,
)
from workers.domain_xml import parse_domain_xml
from workers.domobj import DomainObj
from workers.errors import HostUnavailableError, NotFoundError, QemuError
from workers.heartbeat import Heartbeat
from workers.job_types import JobOperation
from workers.jobs import ActiveJob, JobStore
from workers.jobsignals.listener import SignalListener
from workers.migration import tunnel
from workers.migration.params import MigrationFlags
from workers.migration.storage_fleece import fleece_dir
from workers.monitor import Monitor
from workers.paths import AllowedDirs
from workers.pki import TlsStatus
from workers.ports import PortAllocator
from workers.process import QemuProcess, attach, bound_sockets, remove_sockets
from workers.store import StateStore

log = logging.getLogger(__name__)
T = TypeVar("T")

DESTROY_GRACE_S = 10.0


class HostAgent:
    def __init__(self, settings: Settings, signals: SignalListener) -> None:
        self.settings = settings
        self.host = settings.host
        self.store = StateStore(settings.state_dir)
        self.allowed = AllowedDirs(settings.allowed_dirs)
        self.uuid = self.store.host_uuid(settings.host_uuid)
        self.kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
        # QEMU's user (None: as the worker, root); an unknown user stops the worker here
        self.confinement = confine.resolve(settings.qemu_user, settings.qemu_group)
        confine.reachable_nvram_dir(self.confinement, settings.state_dir,
                                    settings.nvram_dir or settings.state_dir / "nvram")
        confine.reachable_subdir(self.confinement, settings.state_dir,
                                 fleece_dir(settings.state_dir))
        self.domains: dict[str, DomainObj] = {}
        self.graphics_ports = PortAllocator("graphics", *settings.graphics_ports)
        self.migration_ports = PortAllocator("migration", *settings.migration_ports)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="ferry-agent", daemon=True)
        self.redis = broker.connect(settings, retry=True, socket_timeout=5)
        self.jobs = JobStore(self.redis, self.host)
        self.locks = locks.make(settings.lock_manager, self.redis, settings.lease_ttl_ms)
        self.signals = signals  # the phases watch and unwatch their jobs' channels on it
        self.heartbeat = Heartbeat(
            self.redis,
            name=self.host,
            uuid=self.uuid,
            address=settings.migration_address,
            interval_ms=settings.heartbeat_interval_ms,
            ttl_ms=settings.heartbeat_ttl_ms,
            guests=self.active_names,
            on_beat=self.renew_leases,
            tls=TlsStatus(settings.pki_dir, settings.migration_tls == "required").get,
        )

    # -- threads -----------------------------------------------------------------------------
    def start(self) -> None:
        """The loop thread runs, and the guests that outlived the last worker are back."""
        self._thread.start()
        self.call(self._recover(), timeout=120)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` on the agent loop as a task of its own (from any thread)."""
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(coro))

    def announce(self) -> None:
        """The heartbeat starts: clients now route work to this host."""
        self.heartbeat.start()
        log.info(
            "host %s (%s) ready: %d domains, kvm=%s",
            self.host,
            self.uuid,
            len(self.domains),
            self.kvm,
        )

    def withdraw(self) -> None:
        """The heartbeat stops and the host record goes: clients stop routing work here."""
        self.heartbeat.stop()

    def stop(self) -> None:
        """Stop watching; never touches a guest (they outlive the worker)."""
        with contextlib.suppress(Exception):
            self.call(self._detach_all(), timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None,
             tick: Callable[[], None] | None = None, every: float = 0.25) -> T:
        """Run `coro` on the agent loop from a task thread and wait for it.

        `tick` runs in the calling thread every `every` seconds while it waits
        (Perform reports its PROGRESS state to the result backend that way).
        """
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = every if tick is not None else None
            if deadline is not None:
                left = deadline - time.monotonic()
                wait = left if wait is None else min(wait, left)
            try:
                return future.result(max(wait, 0) if wait is not None else None)
            except FutureTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    future.cancel()
                    raise HostUnavailableError(
                        "the host agent did not finish in time", host=self.host
                    ) from None
                if tick is not None:
                    tick()

    def renew_leases(self) -> None:
        held = [d.live for d in list(self.domains.values()) if d.leases_held and d.live]
        if held:
            self.locks.renew(held, self.host)

    def acquire_leases(self, dom: DomainObj, state: str | None = None,
                       check_state: bool = True) -> None:
        if not dom.leases_held:
            pid = dom.proc.pid if dom.proc else 0
            self.locks.acquire(dom.current, self.host, pid, state, check_state)
            dom.leases_held, dom.lockstate = True, None

    def release_leases(self, dom: DomainObj) -> str | None:
        """Release the guest's leases (pause, switch-over, exit); its lockstate."""
        if dom.leases_held:
            dom.lockstate = self.locks.release(dom.current, self.host)
            dom.leases_held = False
        return dom.lockstate

    def active_names(self) -> list[str]:
        return [d.name for d in list(self.domains.values()) if d.active]

    # -- lookups -----------------------------------------------------------------------------
    def lookup(self, ref: str) -> DomainObj:
        """A domain by name or uuid."""
        dom = self.domains.get(ref)
        if dom is not None:
            return dom
        for dom in self.domains.values():
            if dom.uuid == ref.lower():
                return dom
        raise NotFoundError(f"domain '{ref}' not found", host=self.host)

    def parse(self, xml: str, *, stored: bool = False, live: bool = False) -> DomainDef:
        """A definition from a user (checked against host policy) or from our own files."""
        allow = stored or self.settings.allow_qemu_commandline
        d = parse_domain_xml(
            xml,
            allow_qemu_commandline=allow,
            max_memory_kib=self.settings.max_guest_memory_mib * 1024,
            live=live,
        )
        if not stored:  # our own files keep working when the policy tightens
            self.allowed.check_domain(d)
        return d

    # -- the one place where a domain's state changes ---------------------------------------
    def set_state(self, dom: DomainObj, state: DomainState, reason: Reason) -> None:
        if (dom.state, dom.reason) != (state, reason):
            log.info(
                "domain %s: %s:%s -> %s:%s",
                dom.name,
                dom.state.value,
                dom.reason.value,
                state.value,
                reason.value,
            )
        dom.state, dom.reason = state, reason
        if dom.active:
            self.save_status(dom)

    def save_status(self, dom: DomainObj, extra: dict[str, str] | None = None) -> None:
        """The status file: state, pid, live XML, and the job (for a restarted worker)."""
        assert dom.proc is not None and dom.live is not None
        extra = dict(extra or {})
        if dom.job is not None:
            extra["job"] = dom.job.to_status()
        extra["leases"] = json.dumps({"held": dom.leases_held, "lockstate": dom.lockstate})
        if dom.disk_claims:  # a restarted worker gives them back when this QEMU goes
            extra["dac"] = json.dumps([c.to_json() for c in dom.disk_claims])
        self.store.save_status(
            dom.name,
            state=dom.state.value,
            reason=dom.reason.value,
            pid=dom.proc.pid,
            domain_xml=dom.live_status_xml(),
            extra=extra,
        )

    # -- QMP events and process exit --------------------------------------------------------
    def make_monitor(self, dom: DomainObj) -> Monitor:
        return Monitor(dom.current.name,
                       lambda ev, data, ts: self._on_event(dom, ev, data, ts))

    def _on_event(self, dom: DomainObj, event: str, data: dict[str, Any],
                  ts: float = 0.0) -> None:
        log.debug("event %s: %s %s", dom.name, event, data)
        if event in ("STOP", "RESUME"):
            dom.cpu_events[event] = ts  # the guest's pause across a migration
        if event == "STOP" and dom.state == DomainState.RUNNING:
            reason = dom.expected_pause or PausedReason.UNKNOWN
            self.set_state(dom, DomainState.PAUSED, reason)
        elif event == "RESUME" and dom.state == DomainState.PAUSED:
            self.set_state(dom, DomainState.RUNNING, dom.expected_resume or RunningReason.UNPAUSED)
        elif event == "MIGRATION":
            dom.migration_status = str(data.get("status"))
            dom.wakeup.set()
        elif event == "SHUTDOWN":
            dom.guest_shutdown = bool(data.get("guest"))
        elif event == "BLOCK_IO_ERROR" and data.get("action") == "stop":
            dom.expected_pause = PausedReason.IOERROR
        elif event.startswith("BLOCK_JOB_") and dom.storage_out is not None:
            dom.storage_out.on_event(event, data)  # a storage copy's mirror
            dom.wakeup.set()

    def watch(self, dom: DomainObj, proc: QemuProcess) -> None:
        dom.proc = proc
        dom.exited = asyncio.Event()
        self.loop.add_reader(proc.pidfd, self._on_exit, dom, proc)

    def _on_exit(self, dom: DomainObj, proc: QemuProcess) -> None:
        """QEMU is gone: decide why, forget its runtime, keep what persists."""
        self.loop.remove_reader(proc.pidfd)
        status = proc.reap()
        if dom.exit_reason is not None:
            reason = dom.exit_reason
        elif dom.guest_shutdown:
            reason = ShutoffReason.SHUTDOWN
        else:
            reason = ShutoffReason.CRASHED
        log.info("domain %s: QEMU pid %d exited (status %s)", dom.name, proc.pid, status)
        if status == -signal.SIGSYS:
            log.error("domain %s: QEMU was killed by its seccomp sandbox (SIGSYS): it made a "
                      "system call the sandbox forbids (e.g. it tried to start a process)",
                      dom.name)
        self._give_back_disks(dom, restore=reason != ShutoffReason.MIGRATED)
        if dom.monitor is not None:
            self.loop.create_task(dom.monitor.close())
        proc.close()
        dom.proc, dom.monitor, dom.tls_creds = None, None, None
        netdev.remove_macvtaps(dom.current, self.host)  # a tap goes by itself, not these
        self.store.forget_runtime(dom.name, dom.current.uuid)
        remove_sockets(dom.bound_sockets)
        dom.bound_sockets = []
        self.release_ports(dom)
        try:
            self.release_leases(dom)
        except Exception as exc:  # they expire anyway once nobody renews them
            log.error("domain %s: releasing leases failed: %s", dom.name, exc)
        dom.lockstate = None
        self.set_state(dom, DomainState.SHUTOFF, reason)
        dom.live = None if dom.persistent else dom.live
        dom.exit_reason, dom.guest_shutdown = None, False
        dom.expected_pause = dom.expected_resume = None
        if not dom.persistent and self.domains.get(dom.name) is dom:
            self.domains.pop(dom.name, None)
        dom.exited.set()
        dom.wakeup.set()

    def _give_back_disks(self, dom: DomainObj, restore: bool) -> None:
        """The images a confined QEMU held go back to their owners (workers/dac.py);
        not after a migration (the dest uses them) nor while another guest here does."""
        claims, dom.disk_claims = dom.disk_claims, []
        for c in claims:
            in_use = any(c.path == path for other in self.domains.values()
                         if other is not dom and other.active
                         for path, _, _ in dac.guest_paths(other.current))
            dac.release(c, restore=restore, in_use_here=in_use)

    def release_ports(self, dom: DomainObj) -> None:
        ranges = {"graphics": self.graphics_ports, "migration": self.migration_ports}
        for what, port in dom.ports:
            ranges[what].release(port)
        dom.ports.clear()

    async def kill(self, dom: DomainObj, reason: ShutoffReason) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and wait until its exit has been handled."""
        proc = dom.proc
        if proc is None:
            return
        dom.exit_reason = reason
        proc.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(dom.exited.wait(), DESTROY_GRACE_S)
        except TimeoutError:
            log.warning("domain %s: QEMU ignored SIGTERM, killing it", dom.name)
            proc.signal(signal.SIGKILL)
            await asyncio.wait_for(dom.exited.wait(), DESTROY_GRACE_S)

    # -- recovery after a worker restart ----------------------------------------------------
    async def _recover(self) -> None:
        for name, xml in self.store.load_definitions():
            try:
                self.domains[name] = DomainObj(definition=self.parse(xml, stored=True))
            except Exception as exc:
                log.error("ignoring unreadable definition %s: %s", name, exc)
        for rec in self.store.load_statuses():
            try:
                await self._reconnect(rec.name, rec.domain_xml, rec.pid, rec.state, rec.reason)
                dom = self.domains.get(rec.name)
                if dom is not None and dom.active:
                    self._restore_extra(dom, rec.extra)
                else:
                    self._gone_while_away(rec.domain_xml, rec.extra)
            except Exception as exc:
                log.error("domain %s: reconnect failed: %s", rec.name, exc)

    def _gone_while_away(self, xml: str, extra: dict[str, str]) -> None:
        """A QEMU that died while this worker was down: its job's record says so, and
        the images it held go back to their owners."""
        for c in json.loads(extra.get("dac") or "[]"):
            dac.release(dac.Claim.from_json(c), restore=True)
        if extra.get("job"):
            self._job_lost(xml, ActiveJob.from_status(extra["job"]))

    def _job_lost(self, xml: str, job: ActiveJob) -> None:
        """A job's QEMU died while this worker was down: its record says so, where
        the next phase (or domjobinfo) finds the cause."""
        uuid = self.parse(xml, stored=True, live=True).uuid
        err = QemuError(f"the worker of {self.host} restarted and found the QEMU of its "
                        f"{job.operation.replace('_', ' ')} gone", job.phase, self.host)
        self.jobs.set_error(uuid, job.id, err.to_dict())
        log.warning("job %s: %s", job.id, err)
        tunnelled = job.flags & MigrationFlags.TUNNELLED
        if job.operation == JobOperation.INCOMING_MIGRATION and tunnelled:
            tunnel.mark_closed(self.redis, job.id)  # its receiver died with the old worker

    def _restore_extra(self, dom: DomainObj, extra: dict[str, str]) -> None:
        """The job and lease state a status file kept across a worker restart."""
        if extra.get("job"):
            dom.job = ActiveJob.from_status(extra["job"])
        if extra.get("leases"):
            leases = json.loads(extra["leases"])
            dom.leases_held, dom.lockstate = bool(leases["held"]), leases["lockstate"]
        if extra.get("dac"):
            dom.disk_claims = [dac.Claim.from_json(c) for c in json.loads(extra["dac"])]

    async def _reconnect(self, name: str, xml: str, pid: int, state: str, reason: str) -> None:
        live = self.parse(xml, stored=True, live=True)
        dom = self.domains.get(name) or DomainObj(definition=None, live=live)
        proc = attach(pid, live.uuid)
        if proc is None:
            log.warning("domain %s: QEMU pid %d is gone", name, pid)
            self.store.forget_runtime(name, live.uuid)
            remove_sockets(bound_sockets(live.serials, live.channels))
            dom.live = None if dom.persistent else live
            dom.state, dom.reason = DomainState.SHUTOFF, ShutoffReason.FAILED
            if not dom.persistent:
                return
            self.domains[name] = dom
            return
        dom.live = live
        dom.bound_sockets = bound_sockets(live.serials, live.channels)
        self.domains[name] = dom
        for g in live.graphics:
            if g.autoport and g.port is not None:
                self.graphics_ports.reserve(g.port)
                dom.ports.append(("graphics", g.port))
        self.watch(dom, proc)
        mon = self.make_monitor(dom)
        await mon.connect(str(self.store.qmp_socket(live.uuid)), self.settings.qemu_start_timeout_s)
        dom.monitor = mon
        status = await mon.execute("query-status")
        saved = DomainState(state)
        running = bool(status.get("running"))
        actual = DomainState.RUNNING if running else DomainState.PAUSED
        why = (
            parse_reason(actual, reason)
            if saved == actual
            else (RunningReason.UNKNOWN if running else PausedReason.UNKNOWN)
        )
        dom.state = actual
        self.set_state(dom, actual, why)
        log.info("domain %s: reconnected to QEMU pid %d (%s)", name, pid, actual.value)

    async def _detach_all(self) -> None:
        for dom in list(self.domains.values()):
            if dom.proc is not None:
                self.loop.remove_reader(dom.proc.pidfd)
            if dom.monitor is not None:
                await dom.monitor.close()


_AGENT: HostAgent | None = None


def set_agent(agent: HostAgent | None) -> None:
    global _AGENT
    _AGENT = agent


def get_agent() -> HostAgent:
    if _AGENT is None:
        raise QemuError("no host agent runs in this process (is this a ferry worker?)")
    return _AGENT
