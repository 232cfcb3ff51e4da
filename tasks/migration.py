"""Celery tasks for the migration phases, each on the queue of the host where it runs.

A phase task never raises into the chain: it records its error in the state
and returns it, so the clean-up phases after it still run (in their
cancelled form).  The last phase of a chain raises the FIRST error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from celery.exceptions import Ignore

from tasks.checked import task
from tasks.phase_tasks import PhaseTask
from workers.agent import HostAgent, get_agent
from workers.domain_xml import parse_domain_xml
from workers.errors import FerryError, MigrationError
from workers.job_types import Phase
from workers.jobs import jobinfo_view
from workers.migration import dest, source
from workers.migration.chain_state import MigrationState, rebuild_error
from workers.migration.params import MigrationParams
from workers.slots import Line, Slots, pair_name

log = logging.getLogger(__name__)

PhaseFn = Callable[[HostAgent, MigrationState], Coroutine[Any, Any, MigrationState]]


def run_phase(fn: PhaseFn, phase: Phase, st: MigrationState,
              report: Callable[[dict[str, Any]], None] | None = None) -> MigrationState:
    """Run phase `fn` on this host's agent; its error goes into the state, never up."""
    agent = get_agent()
    if agent.jobs.ended(st.params.job_id):
        # A stale redelivery of a job that has ended: run nothing, keep its results.
        log.warning("job %s ended already: ignoring a late %s", st.params.job_id, phase)
        raise Ignore()
    cancelled = st.failed
    started = time.monotonic()
    tick: Callable[[], None] | None = None
    if report is not None:
        name = st.params.domain

        def report_progress() -> None:
            dom = agent.domains.get(name)
            job = dom.job if dom is not None else None
            if job is not None and job.progress:
                report(job.progress)
        tick = report_progress
    try:
        st = agent.call(fn(agent, st), tick=tick)
        ok = not st.failed or cancelled
    except FerryError as exc:
        st, ok = st.with_error(exc.at(phase=phase, host=agent.host)), False
    except Exception as exc:  # a bug must not break the chain and skip the clean-up
        log.exception("phase %s crashed", phase)
        err = MigrationError(f"internal error: {type(exc).__name__}: {exc}", phase, agent.host)
        st, ok = st.with_error(err), False
    st = st.with_phase(phase, agent.host, started, ok, cancelled)
    _log_phase(st, phase, agent.host)
    return st


def _log_phase(st: MigrationState, phase: Phase, host: str) -> None:
    p, rec = st.params, st.phases[-1]
    cookie = st.cookie or ""
    sections = [s for s in ("graphics", "lockstate", "domain", "nbd", "statistics")
                if f"<{s}" in cookie]
    log.debug("migration job=%s domain=%s host=%s phase=%s flags=%s protocol=%d uri=%s "
              "cookie_bytes=%d cookie_sections=%s elapsed_ms=%.1f outcome=%s%s",
              p.job_id, p.domain, host, phase, ",".join(p.flag_names()), p.protocol,
              st.uri, len(cookie.encode()), ",".join(sections), rec.elapsed_ms,
              "cancelled" if rec.cancelled else ("ok" if rec.ok else "failed"),
              f" error={st.error['message']!r}" if st.error else "")


def summary(st: MigrationState) -> dict[str, Any]:
    p = st.params
    return {"job_id": p.job_id, "domain": p.domain, "source": p.source, "dest": p.dest,
            "protocol": p.protocol, "flags": p.flag_names(),
            "result": "failed" if st.failed else "completed",
            "error": st.error["message"] if st.error else None,
            "cleanup_errors": [e["message"] for e in st.cleanup_errors],
            "statistics": st.statistics, "dest_domain": st.result,
            "phases": [vars(r) for r in st.phases]}


def chain_result(st: MigrationState) -> dict[str, Any]:
    """The end of a chain: the summary, or the FIRST error raised."""
    if st.error is not None:
        raise rebuild_error(st.error)
    return summary(st)


RETRY_S = 0.25  # how soon a migration waiting for a slot asks again
OUTGOING = (Line.PAIR, Line.OUT)  # taken by the source, in this order, before the job runs
INCOMING = (Line.IN,)


def _line(agent: HostAgent, line: Line, p: MigrationParams) -> tuple[Slots, int]:
    cfg = agent.settings
    if line == Line.PAIR:
        return Slots(agent.redis, pair_name(p.source, p.dest)), cfg.max_pair_migrations
    limit = cfg.max_outgoing_migrations if line == Line.OUT else cfg.max_incoming_migrations
    return Slots(agent.redis, agent.host), limit


def wait_turn(task: Any, lines: tuple[Line, ...], p: MigrationParams,
              xml: str | None = None) -> bool:
    """Go on (True) if every line (pair, out, in) has a free slot for the job; else retry,
    keeping the job's place in line (and no worker thread while it waits).  A waiting
    job is shown queued in domjobinfo, with the line and its place in it.  An abort
    while it waits takes it out of every line: False, the phase then fails as aborted."""
    agent = get_agent()
    job_id = p.job_id
    for line in lines:
        slots, limit = _line(agent, line, p)
        place = slots.place(line.value, job_id, limit)
        if not place:
            continue
        uuid = _domain_uuid(agent, p, xml)
        if uuid is not None and agent.jobs.abort_requested(uuid, job_id):
            log.info("job %s: aborted while waiting in the %s line", job_id, line.value)
            give_back(lines, p)
            agent.jobs.clear_queued(uuid, job_id)
            return False
        if uuid is not None:
            _show_queued(agent, p, uuid, line, place)
        raise task.retry(countdown=RETRY_S)  # the task allows unlimited retries
    if task.request.retries:  # it waited: it is no longer queued
        uuid = _domain_uuid(agent, p, xml)
        if uuid is not None:
            agent.jobs.clear_queued(uuid, job_id)
    return True


async def aborted_in_line(agent: HostAgent, st: MigrationState) -> MigrationState:
    """The phase of a migration aborted while it waited for its turn."""
    raise MigrationError("operation aborted: migration job canceled by client while it "
                         "waited in line")


def _show_queued(agent: HostAgent, p: MigrationParams, uuid: str, line: Line,
                 place: int) -> None:
    agent.jobs.set_queued(uuid, {"id": p.job_id, "line": line.value, "place": place,
                                 "source": p.source, "dest": p.dest})


def _domain_uuid(agent: HostAgent, p: MigrationParams, xml: str | None) -> str | None:
    """The guest's uuid: from the definition on its way (dest), or the source's domain."""
    try:
        if xml is not None:
            return parse_domain_xml(xml, allow_qemu_commandline=True).uuid
        return str(agent.call(_uuid_of(agent, p.domain)))
    except FerryError:
        return None  # the phase itself will say what is wrong


def give_back(lines: tuple[Line, ...], p: MigrationParams) -> None:
    agent = get_agent()
    for line in lines:
        slots, _ = _line(agent, line, p)
        slots.give_back(line.value, p.job_id)


@task(PhaseTask.BEGIN3, bind=True, max_retries=None)
def begin3(self: Any, params: dict[str, Any]) -> dict[str, Any]:
    st = MigrationState(params=MigrationParams.from_json(params))
    fn = source.begin3 if wait_turn(self, OUTGOING, st.params) else aborted_in_line
    return run_phase(fn, Phase.BEGIN3, st).to_json()


@task(PhaseTask.PREPARE3, bind=True, max_retries=None)
def prepare3(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    return _prepare(self, MigrationState.from_json(state), v3=True)


def _prepare(task: Any, st: MigrationState, *, v3: bool) -> dict[str, Any]:
    """Prepare (v2 or v3) once the dest has an incoming slot for the job."""
    fn: PhaseFn = aborted_in_line
    if wait_turn(task, INCOMING, st.params, st.xml):
        fn = lambda a, s: dest.prepare(a, s, v3=v3)  # noqa: E731
    try:
        st = run_phase(fn, Phase.PREPARE, st)
    except Ignore:  # a late redelivery of an ended job: it holds no slot either
        give_back(INCOMING, st.params)
        raise
    if st.failed:
        # A failed Prepare leaves no incoming QEMU: the slot goes back now, not at
        # Finish, which a message sent on its own (or a broken chain) never reaches.
        give_back(INCOMING, st.params)
    return st.to_json()


def progress_reporter(task: Any) -> Callable[[dict[str, Any]], None]:
    """PROGRESS state with QEMU's figures, for Flower and result-backend readers."""
    def report(progress: dict[str, Any]) -> None:
        try:
            task.update_state(state="PROGRESS", meta=progress)
        except Exception as exc:  # the broker away must not fail the phase QEMU runs on
            log.warning("progress not reported: %s", exc)
    return report


@task(PhaseTask.PERFORM3, bind=True)
def perform3(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    st = MigrationState.from_json(state)
    return run_phase(source.perform3, Phase.PERFORM3, st, progress_reporter(self)).to_json()


@task(PhaseTask.FINISH3)
def finish3(state: dict[str, Any]) -> dict[str, Any]:
    st = MigrationState.from_json(state)
    try:
        return run_phase(lambda a, s: dest.finish(a, s, v3=True), Phase.FINISH3, st).to_json()
    finally:
        give_back(INCOMING, st.params)


@task(PhaseTask.CONFIRM3)
def confirm3(state: dict[str, Any]) -> dict[str, Any]:
    st = MigrationState.from_json(state)
    try:
        st = run_phase(source.confirm3, Phase.CONFIRM3, st)
    finally:
        give_back(OUTGOING, st.params)
    return chain_result(st)


@task(PhaseTask.PREPARE2, bind=True, max_retries=None)
def prepare2(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    return _prepare(self, MigrationState.from_json(state), v3=False)


@task(PhaseTask.PERFORM2, bind=True, max_retries=None)
def perform2(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    st = MigrationState.from_json(state)
    fn = source.perform2 if wait_turn(self, OUTGOING, st.params) else aborted_in_line
    try:
        return run_phase(fn, Phase.PERFORM2, st, progress_reporter(self)).to_json()
    finally:
        give_back(OUTGOING, st.params)


@task(PhaseTask.FINISH2)
def finish2(state: dict[str, Any], last: bool = True) -> dict[str, Any]:
    """The end of a managed v2 chain; a p2p source calls it with last=False for the state."""
    st = MigrationState.from_json(state)
    try:
        st = run_phase(lambda a, s: dest.finish(a, s, v3=False), Phase.FINISH2, st)
    finally:
        give_back(INCOMING, st.params)
    return chain_result(st) if last else st.to_json()


@task("domjobinfo")
def domjobinfo(domain: str, completed: bool = False) -> dict[str, Any]:
    agent = get_agent()
    uuid = agent.call(_uuid_of(agent, domain))
    if completed:
        return jobinfo_view(agent.jobs.completed(uuid, agent.host), agent.host, completed=True)
    return jobinfo_view(agent.jobs.get(uuid), agent.host, queued=agent.jobs.queued(uuid))


async def _uuid_of(agent: HostAgent, domain: str) -> str:
    return agent.lookup(domain).uuid
