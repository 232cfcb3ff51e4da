"""Migration phases on the source host: Begin, Perform, Confirm (and v2's Perform).

Each is a coroutine on the agent loop taking and returning MigrationState.
Errors propagate; the task wrapper records them in the state, so the
chain goes on with the clean-up phases.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis

from workers import confine, failpoints
from workers.abi import check_abi_stability
from workers.agent import HostAgent
from workers.cpumodel import with_running_cpu
from workers.domain_states import DomainState, PausedReason, RunningReason, ShutoffReason
from workers.domain_xml import format_domain_xml
from workers.domobj import DomainObj
from workers.errors import FerryError, MigrationError, OperationInvalidError
from workers.hostcaps import cpu_signature, require_postcopy, sees_host_cpu
from workers.job_types import JobOperation, Phase
from workers.jobs import ActiveJob
from workers.lifecycle import pause_cpus, run_cpus
from workers.migration import qemu_migrate, storage, stream_stats, tls
from workers.migration.chain_state import MigrationState
from workers.migration.cookie import (
    Cookie,
    CookieGraphics,
    CookieLockstate,
    CookieStatistics,
    make_cookie,
    parse,
)
from workers.migration.guards import check_abort, end_outgoing_job, refuse_v2_with_lease_state
from workers.migration.params import MigrationFlags as F
from workers.migration.params import MigrationParams
from workers.migration.progress import (
    DowntimeSchedule,
    ProgressTracker,
    TransferWatch,
    downtime_steps,
)
from workers.migration.tunnel_ends import SourceEnds, socket_path
from workers.pki import CA_FILE, Role

log = logging.getLogger(__name__)

OWN_STATISTICS = ("disk_copy_ms",)  # ferry's figures beside libvirt's (not in the cookie)


def _job_dom(agent: HostAgent, p: MigrationParams, phase: Phase) -> DomainObj:
    """The domain of this job, with the job's phase moved to `phase`."""
    dom = agent.lookup(p.domain)
    if dom.job is None or dom.job.id != p.job_id:
        raise OperationInvalidError(f"domain '{p.domain}' is not in migration job {p.job_id}")
    dom.job.phase = phase
    agent.jobs.set_phase(dom.uuid, p.job_id, phase)
    return dom


def _start_job(agent: HostAgent, dom: DomainObj, p: MigrationParams, phase: Phase) -> None:
    agent.jobs.start(dom.uuid, job_id=p.job_id, kind=JobOperation.OUTGOING_MIGRATION.kind,
                     phase=phase,
                     source=p.source, dest=p.dest, flags=p.flags)
    dom.job = ActiveJob(p.job_id, JobOperation.OUTGOING_MIGRATION, phase, time.time(),
                        source=p.source, dest=p.dest, flags=p.flags)
    if dom.active:  # a restarted worker finds the job (and what Begin was given)
        dom.job.state = MigrationState(params=p)
        agent.save_status(dom)


async def begin3(agent: HostAgent, st: MigrationState) -> MigrationState:
    p = st.params
    dom = agent.lookup(p.domain)
    offline = p.has(F.OFFLINE)
    if offline:
        dom.require_inactive("migrate offline")
        if not dom.persistent:
            raise OperationInvalidError("offline migration needs a persistent domain")
    else:
        dom.require_active("migrate")
        dom.require_state("migrate", DomainState.RUNNING, DomainState.PAUSED)
    dom.require_no_job("migrate")
    if p.has(F.POSTCOPY):
        require_postcopy(agent.confinement is not None)
    tls.check_material(agent, p, Role.CLIENT)
    _start_job(agent, dom, p, Phase.BEGIN3)
    await agent.signals.watch(dom.uuid)
    current = dom.current
    chosen = current
    if p.xmlin:
        chosen = with_running_cpu(agent.parse(p.xmlin), current)
        check_abi_stability(current, chosen)
    spice = any(g.type == "spice" for g in current.graphics)
    nbd = await storage.begin_nbd(dom, p, agent.host, storage.copies_resumably(agent, p)) \
        if p.storage_copy else None
    mandatory = [*(["graphics"] if spice else []), *(["nbd"] if nbd else [])]
    cookie = make_cookie(current.name, current.uuid, agent.host, agent.uuid, nbd=nbd,
                         mandatory=mandatory)
    was_running = dom.state == DomainState.RUNNING and not p.has(F.PAUSED)
    await failpoints.hit("begin3.end")
    cpu = cpu_signature(agent.settings.cpu_hide_features) if sees_host_cpu(current) else None
    return replace(st, xml=format_domain_xml(chosen, migratable=True), cookie=cookie.to_xml(),
                   was_running=was_running, source_cpu=cpu)


async def perform3(agent: HostAgent, st: MigrationState) -> MigrationState:
    p = st.params
    if st.failed:
        return st  # Begin or Prepare failed: Confirm undoes what was started
    dom = agent.lookup(p.domain)
    if dom.job is not None and dom.job.id == p.job_id and dom.job.phase in (
            Phase.PERFORM3, Phase.PERFORM3_DONE):
        return await resume_perform(agent, dom, st)  # redelivered, or after a restart
    dom = _job_dom(agent, p, Phase.PERFORM3)
    assert dom.job is not None
    if not dom.active and not p.has(F.OFFLINE):
        raise MigrationError(f"the QEMU of '{dom.name}' exited ({dom.reason.value}) before "
                             "Perform: the guest is lost, nothing to migrate")
    dom.job.state = st  # what a restarted worker resumes Perform from
    if dom.active:
        agent.save_status(dom)
    check_abort(agent, dom, dom.uuid, p.job_id)
    dest_cookie = parse(st.cookie or "", expect_uuid=dom.uuid)
    if not p.has(F.OFFLINE):
        try:
            st = await _migrate(agent, dom, st, dest_cookie)
        except MigrationError as exc:
            told = _dest_told(agent, dom.uuid, p.job_id)
            if told is None:
                raise
            raise MigrationError(f"{exc.message} ({told})", cause=exc.cause) from exc
    return _perform_done(agent, dom, st)


def _dest_told(agent: HostAgent, uuid: str, job_id: str) -> str | None:
    """What another host recorded as this job's error while QEMU copied (a restarted
    dest worker that found its QEMU gone): the source's QEMU saw only a closed stream."""
    rec = agent.jobs.get(uuid)
    error = rec.get("error") if rec is not None and rec.get("id") == job_id else None
    if not isinstance(error, dict) or error.get("host") in (None, agent.host):
        return None
    return str(error.get("message") or "") or None


async def resume_perform(agent: HostAgent, dom: DomainObj,
                         st: MigrationState) -> MigrationState:
    """Perform ran on this host before (its task redelivered, or the worker restarted):
    never a second `migrate`.  QEMU says how it ended: completed → the switch-over
    happened, finish the phase; anything else → cancel it, the phase failed."""
    assert dom.job is not None
    if dom.job.phase == Phase.PERFORM3_DONE and dom.job.state is not None:
        return dom.job.state
    info = await dom.require_monitor("resume perform").execute("query-migrate")
    status = str(info.get("status", "none"))
    if status not in qemu_migrate.ACTIVE:
        await tls.remove_creds(dom, stale=True)
    if status != "completed" and not status.startswith("postcopy"):
        if st.params.storage_copy:
            await storage.cancel_leftovers(dom, agent.settings.state_dir)
        await qemu_migrate.cancel(dom)
        raise MigrationError(f"perform3 was interrupted (worker restart or redelivery); "
                             f"QEMU's migration was {status}: cancelled")
    agent.set_state(dom, DomainState.PAUSED, PausedReason.POSTCOPY
                    if status.startswith("postcopy") else PausedReason.MIGRATION)
    stats = qemu_migrate.progress_of(info, int(dom.job.started * 1000))
    stats.pop("status", None)
    agent.release_leases(dom)
    st = replace(st, source_paused_by_us=True, statistics=stats)
    return _perform_done(agent, dom, st)


def _perform_done(agent: HostAgent, dom: DomainObj, st: MigrationState) -> MigrationState:
    p = st.params
    persistent = None
    if p.has(F.PERSIST_DEST):
        persistent = st.xml if p.xmlin or dom.definition is None else \
            format_domain_xml(dom.definition, migratable=True)
    stats = CookieStatistics.from_dict(st.statistics) if st.statistics else None
    # Leases were released at the switch-over (or at an earlier pause): their state
    # goes to Finish, which takes them with it before starting the CPUs.
    lockstate = None
    if agent.locks.keeps_state and dom.lockstate is not None:
        lockstate = CookieLockstate(agent.locks.driver, dom.lockstate)
    out = make_cookie(dom.name, dom.uuid, agent.host, agent.uuid, persistent_xml=persistent,
                      statistics=stats, lockstate=lockstate)
    st = replace(st, cookie=out.to_xml())
    _job_dom(agent, p, Phase.PERFORM3_DONE)
    assert dom.job is not None
    dom.job.state = st
    if dom.active:
        agent.save_status(dom)
    return st


async def _migrate(agent: HostAgent, dom: DomainObj, st: MigrationState,
                   dest_cookie: Cookie | None) -> MigrationState:
    """Run QEMU's migration to st.uri (the disks first, with a storage copy); on success
    the source is paused:migration."""
    p = st.params
    mon = dom.require_monitor("migrate")
    entered = time.time()  # a STOP from here on is this migration's (or --suspend's)
    if dest_cookie is not None and dest_cookie.graphics is not None:
        await _relocate_spice(agent, dom, dest_cookie.graphics)
    if not p.has(F.LIVE) and dom.state == DomainState.RUNNING:
        await pause_cpus(agent, dom, PausedReason.MIGRATION)
        st = replace(st, source_paused_by_us=True)
    job = dom.job
    assert job is not None
    conv = Convergence(agent, dom, p)
    started_ms = int(time.time() * 1000)
    dom.expected_pause = PausedReason.MIGRATION
    # QEMU restarts the CPUs itself when a migration fails after it stopped them for the
    # switch-over (e.g. the dest refused it over the return path): migration_canceled.
    dom.expected_resume = RunningReason.MIGRATION_CANCELED
    try:
        await qemu_migrate.setup(mon, p, outgoing=True, bandwidth_mib_s=job.bandwidth_mib_s,
                                 downtime_ms=conv.initial_downtime(),
                                 tls=await _tls_params(agent, dom, st))
        await failpoints.hit("perform3.before_migrate")
        check_abort(agent, dom, dom.uuid, p.job_id)
        uri = await _data_uri(agent, dom, mon, st)
        copy = await storage.copy_disks(agent, dom, st, dest_cookie, conv.record, conv.tick)
        if copy is not None:
            copy.ram_started = True
        dom.migration_status = None  # from here on, QEMU's events for this migration
        await failpoints.hit("perform3.before_qemu_migrate")
        await mon.execute("migrate", {"uri": uri})
        if job.abort:  # it came after check_abort: its cancel found no migration yet
            raise MigrationError("operation aborted: migration job canceled by client")
        info = await qemu_migrate.wait(dom, mon, started_ms=started_ms,
                                       on_progress=conv.progress, on_tick=conv.tick,
                                       on_failed=_failure_teller(agent, st),
                                       at_switchover=storage.at_switchover(dom, copy)
                                       if copy else None,
                                       until_postcopy=p.has(F.POSTCOPY))
    except FerryError:
        if dom.storage_out is not None:
            await dom.storage_out.abort()  # first: a stalled dest would hang the cancel
        if dom.active or dom.tunnel is not None:
            await qemu_migrate.cancel(dom)
        raise
    finally:
        dom.expected_pause = dom.expected_resume = None
        dom.storage_out = None
        tunnel_bytes = await _end_tunnel(agent, dom)
        await tls.remove_creds(dom)
    await failpoints.hit("perform3.after_migrate")
    # QEMU stopped the CPUs for the switch-over: say so, do not wait for STOP.  In
    # post-copy the dest is about to run the guest while pages still leave from here.
    postcopy = info.get("status") == "postcopy-active"
    agent.set_state(dom, DomainState.PAUSED,
                    PausedReason.POSTCOPY if postcopy else PausedReason.MIGRATION)
    st = replace(st, source_paused_by_us=True)
    stats = qemu_migrate.progress_of(info, started_ms)
    stats.pop("status", None)
    if copy is not None:
        stats.update(copy.statistics())
    stats.update(stream_stats.figures(p, stats, tunnel_bytes))
    if st.was_running:
        stats.update(stream_stats.stop_mark(dom.cpu_events.get("STOP"), entered))
    agent.release_leases(dom)
    return replace(st, statistics=stats)


async def _tls_params(agent: HostAgent, dom: DomainObj, st: MigrationState) -> dict[str, str]:
    """A TLS stream: the client credentials and the name the dest's certificate must have."""
    if not st.params.has(F.TLS):
        return dict(tls.PLAIN)
    assert st.uri is not None
    hostname = tls.dial_host(st.uri)
    return {"tls-creds": await tls.add_creds(agent, dom, Role.CLIENT), "tls-hostname": hostname}


def _failure_teller(agent: HostAgent, st: MigrationState
                    ) -> Callable[[str | None], FerryError | None] | None:
    """How a failed stream is told: a TLS stream's handshake failures in ferry's words."""
    if not st.params.has(F.TLS) or st.uri is None:
        return None
    uri = st.uri
    ca_file = agent.settings.pki_dir / CA_FILE
    return lambda desc: tls.stream_failure(st.params, uri, desc, ca_file)


async def _data_uri(agent: HostAgent, dom: DomainObj, mon: Any, st: MigrationState) -> str:
    """Where QEMU sends its stream: Prepare's URI, or a tunnel through the broker (one
    socketpair, or a listener for QEMU's parallel connections: tunnel_ends.py)."""
    p = st.params
    if not p.has(F.TUNNELLED):
        assert st.uri is not None
        return st.uri
    ends = SourceEnds(agent.settings, p.job_id, channels=p.channels + 1 if p.channels else 1)
    dom.tunnel = ends  # from here on a cancel closes it
    if p.channels:
        conf = agent.confinement
        path = socket_path(confine.socket_dir(conf, agent.store.run), "tun", p.job_id)
        return await asyncio.get_running_loop().run_in_executor(
            None, ends.listen, path, (conf.uid, conf.gid) if conf else None)
    ends.attach(await qemu_migrate.pass_socket(mon, qemu_migrate.TUNNEL_FD))
    return f"fd:{qemu_migrate.TUNNEL_FD}"


async def _end_tunnel(agent: HostAgent, dom: DomainObj) -> int | None:
    """Close the tunnel's ends; the bytes it carried (None: no tunnel)."""
    tunnel, dom.tunnel = dom.tunnel, None
    if tunnel is None:
        return None
    await asyncio.get_running_loop().run_in_executor(None, tunnel.finish, 10.0)
    return int(tunnel.bytes)


class Convergence:
    """Per wait-loop turn: progress to the job, --timeout, abort_on_error, downtime steps."""

    def __init__(self, agent: HostAgent, dom: DomainObj, p: MigrationParams) -> None:
        self.agent, self.dom, self.p = agent, dom, p
        self.tracker = ProgressTracker()
        s = agent.settings
        gib = dom.current.memory_kib / (1024 * 1024)
        self.schedule = DowntimeSchedule(list(downtime_steps(
            s.downtime_ms, s.downtime_steps, s.downtime_delay_s, gib)))
        self.stalled = False
        self.timed_out = False
        self.watch = TransferWatch(s.migration_stall_timeout_s)
        self.status = ""

    def user_downtime(self) -> int | None:
        job = self.dom.job
        return (job.max_downtime_ms if job else None) or self.p.max_downtime_ms

    def initial_downtime(self) -> int | None:
        return self.user_downtime() or self.schedule.due(0.0, False)

    def progress(self, stats: dict[str, Any]) -> None:
        self.watch.update(int(stats.get("memory_processed") or 0), time.monotonic())
        self.status = str(stats.get("status") or "")
        if stats and self.dom.storage_out is not None:  # the mirrors run beside the RAM
            stats = {**stats, **self.dom.storage_out.progress()}
        self.record(stats)

    def record(self, stats: dict[str, Any]) -> None:
        """The figures to the job (in memory, the job record, Celery's PROGRESS)."""
        job = self.dom.job
        if job is None or not stats:
            return
        tunnel = self.dom.tunnel
        stats.update(stream_stats.figures(self.p, stats,
                                          None if tunnel is None else int(tunnel.bytes)))
        job.progress = self.tracker.update(stats, time.monotonic())
        self.stalled = bool(job.progress.get("stalled"))
        try:  # the broker being away must not harm the migration QEMU is running
            self.agent.jobs.set_progress(self.dom.uuid, job.id, job.progress)
        except redis.RedisError as exc:
            log.warning("job %s: progress not recorded: %s", job.id, exc)

    def tick(self, elapsed: float) -> None:
        dom, p = self.dom, self.p
        if self.watch.stuck(time.monotonic()) and not self.status.startswith("postcopy"):
            # Post-copy cannot be cancelled (the dest runs the guest); anything
            # before the switch-over can: the source runs on.
            raise MigrationError(f"the migration stream sent nothing for "
                                 f"{self.watch.limit_s:.0f}s (network to the dest cut?): "
                                 "cancelled")
        if self.dom.storage_out is not None:
            self.dom.storage_out.check()  # a mirror that fails or stalls mid-RAM
        if p.has(F.ABORT_ON_ERROR) and dom.reason == PausedReason.IOERROR:
            raise MigrationError("migration aborted: the guest hit an I/O error")
        if p.timeout_s and elapsed > p.timeout_s and not self.timed_out and \
                dom.state == DomainState.RUNNING:
            self.timed_out = True
            log.info("domain %s: migration timeout %ss reached, pausing to converge",
                     dom.name, p.timeout_s)
            self.agent.loop.create_task(pause_cpus(self.agent, dom, PausedReason.MIGRATION))
        if self.user_downtime() is None and dom.monitor is not None:
            downtime = self.schedule.due(elapsed, self.stalled)
            if downtime is not None:
                log.info("domain %s: downtime step to %d ms", dom.name, downtime)
                self.agent.loop.create_task(dom.monitor.execute(
                    "migrate-set-parameters", {"downtime-limit": downtime}))


async def _relocate_spice(agent: HostAgent, dom: DomainObj, graphics: CookieGraphics) -> None:
    if graphics.type != "spice" or dom.monitor is None:
        return
    args: dict[str, object] = {"protocol": "spice", "hostname": graphics.listen,
                               "port": graphics.port}
    if graphics.tls_port and graphics.tls_port > 0:
        args["tls-port"] = graphics.tls_port
    if graphics.tls_subject:
        args["cert-subject"] = graphics.tls_subject
    try:
        await dom.monitor.execute("client_migrate_info", args)
    except FerryError as exc:  # clients reconnect by hand; the migration goes on
        log.warning("domain %s: SPICE relocation failed: %s", dom.name, exc)


async def confirm3(agent: HostAgent, st: MigrationState) -> MigrationState:
    p = st.params
    dom = agent.domains.get(p.domain)
    if dom is None or dom.job is None or dom.job.id != p.job_id:
        return st  # Begin never started a job here: nothing to confirm or undo
    phase = Phase.CONFIRM3_CANCELLED if st.failed else Phase.CONFIRM3
    st = _with_own_statistics(st, dom)
    _job_dom(agent, p, phase)
    await failpoints.hit("confirm3.start")
    uuid = dom.uuid  # an undefined source has no definition left to ask
    try:
        if st.failed:
            await _resume_source(agent, dom, st)
        else:
            st = await _postcopy_done(agent, dom, st)
            await _finish_source(agent, dom, p)
    finally:
        end_outgoing_job(agent, dom, uuid, st)
    return st


async def _postcopy_done(agent: HostAgent, dom: DomainObj, st: MigrationState) -> MigrationState:
    """A post-copy migration: QEMU here sends pages until the dest has them all; only
    then may it go.  Its last figures (pages the dest asked for) are the job's."""
    if dom.reason != PausedReason.POSTCOPY or not dom.active:
        return st
    info = await qemu_migrate.wait_postcopy_end(dom, agent.settings.incoming_timeout_s)
    if info is None or info.get("status") != "completed":
        raise MigrationError(f"post-copy did not complete on the source "
                             f"({(info or {}).get('status', 'no answer')}); the guest runs "
                             f"on the dest, whose memory may be incomplete")
    stats = qemu_migrate.progress_of(info, int((st.statistics or {}).get("started") or 0))
    stats.pop("status", None)
    return replace(st, statistics=stats)


def _with_own_statistics(st: MigrationState, dom: DomainObj) -> MigrationState:
    """The statistics Perform recorded here, when Finish's answer lacks them (a restarted
    dest answers for a Finish that had started the CPUs from what Prepare saved), and
    the ones of ferry's own that the cookie does not carry (disk_copy_ms)."""
    if dom.job is None or dom.job.state is None or not dom.job.state.statistics:
        return st
    own = dom.job.state.statistics
    if not st.statistics:
        return replace(st, statistics=dict(own))
    extra = {k: v for k, v in own.items() if k in OWN_STATISTICS and k not in st.statistics}
    return replace(st, statistics={**st.statistics, **extra}) if extra else st


async def _resume_source(agent: HostAgent, dom: DomainObj, st: MigrationState) -> None:
    """Migration failed: the guest goes on here, as it was before (libvirt's
    qemuMigrationSrcRestoreDomainState: only a guest that was paused is resumed)."""
    if not dom.active or dom.monitor is None:
        return
    if st.outcome_unknown or dom.reason == PausedReason.POSTCOPY:
        # After a switch into post-copy the dest has run the guest: never both.
        log.error("domain %s: the dest may have started it; it stays paused here",
                  dom.name)
        return
    if st.params.storage_copy:  # libvirt's Confirm cancels the copy once more
        await storage.cancel_leftovers(dom, agent.settings.state_dir)
    status = await dom.monitor.execute("query-status")
    if not st.was_running:
        return
    if status.get("running"):
        # QEMU resumes the guest itself when the migration fails after it stopped it (the
        # return path said the dest could not load the state): no `cont`, but the reason.
        stopped = dom.job is not None and dom.cpu_events.get("STOP", 0.0) >= dom.job.started
        if dom.state != DomainState.RUNNING or stopped:
            agent.set_state(dom, DomainState.RUNNING, RunningReason.MIGRATION_CANCELED)
    else:
        await run_cpus(agent, dom, RunningReason.MIGRATION_CANCELED)


async def _finish_source(agent: HostAgent, dom: DomainObj, p: MigrationParams) -> None:
    if dom.active:
        await agent.kill(dom, ShutoffReason.MIGRATED)
    if p.has(F.UNDEFINE_SOURCE) and dom.persistent:
        name = dom.name
        agent.store.delete_definition(name)
        if agent.domains.get(name) is dom:
            agent.domains.pop(name)
        dom.definition = None


async def perform2(agent: HostAgent, st: MigrationState) -> MigrationState:
    """v2: migrate, then at once kill the source on success or resume it on failure."""
    p = st.params
    dom = agent.lookup(p.domain)
    if st.failed:
        return st
    dom.require_active("migrate")
    dom.require_no_job("migrate")
    refuse_v2_with_lease_state(agent)
    if p.has(F.POSTCOPY):
        require_postcopy(agent.confinement is not None)
    tls.check_material(agent, p, Role.CLIENT)
    _start_job(agent, dom, p, Phase.PERFORM2)
    uuid = dom.uuid
    await agent.signals.watch(uuid)
    st = replace(st, was_running=dom.state == DomainState.RUNNING and not p.has(F.PAUSED))
    try:
        st = await _migrate(agent, dom, st, None)
    except FerryError as exc:
        st = st.with_error(exc.at(phase=Phase.PERFORM2, host=agent.host))
        try:
            await _resume_source(agent, dom, st)
        except FerryError as resume_exc:
            st = st.with_error(resume_exc.at(phase=Phase.PERFORM2, host=agent.host))
        end_outgoing_job(agent, dom, uuid, st, end_record=False)
        return st
    await _finish_source(agent, dom, p)
    end_outgoing_job(agent, dom, uuid, st, end_record=False)
    return st
