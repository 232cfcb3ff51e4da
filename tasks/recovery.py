"""A restarted worker picks up the migrations it was in the middle of.

With late acknowledgement a phase that was running when its worker died is
delivered again only after the broker's visibility timeout (hours), so the
worker does not wait for that.  For every guest whose status file says it
was in a migration here, it compares the phase with the job record (where
the chain had got to) and sends the rest of the chain itself, under the
job's task ids, so the caller waiting on the job gets its result:

- source in Begin (managed: the chain had not moved on; p2p: the task that
  drove the migration died with the worker): the job fails, the dest is
  cleaned up, the guest runs on here;
- source past Begin while the dest prepares (managed: the chain is with the
  dest): libvirt's rule, a source restarted before the switch-over rolls
  back; the job is marked cancelled and Perform, when it comes, fails with
  that reason, so Finish discards the incoming guest and the guest runs on
  here;
- source in Perform: QEMU says how far it got (never a second `migrate`);
- source past Perform whose Confirm will not come (p2p, or killed during
  Confirm): wait for Finish's answer, then Confirm; with no answer, the
  Finish fence decides, as in a p2p source that gave up waiting;
- dest in Prepare or Finish whose answer was lost with the worker, CPUs not
  started: the job fails from that phase on (the incoming QEMU goes, the
  source resumes); CPUs started: the guest runs here, Finish's answer is
  given (and its incoming line given back) and Confirm follows.

A phase redelivered later finds the job ended and runs nothing.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import chain

from config.celery_app import app, queue_for
from tasks import results
from tasks.migration import INCOMING, give_back
from tasks.p2p import finish_unanswered
from tasks.phase_tasks import ON_SOURCE, V3_CHAIN, PhaseTask
from workers.agent import HostAgent
from workers.domain_states import DomainState
from workers.domobj import DomainObj
from workers.errors import FerryError, HostUnavailableError, MigrationError
from workers.job_types import JobOperation, Phase
from workers.migration.chain_state import MigrationState
from workers.migration.dest import complete_incoming
from workers.migration.params import MigrationFlags
from workers.migration.source import resume_perform

log = logging.getLogger(__name__)

_TAIL = [PhaseTask.FINISH3, PhaseTask.CONFIRM3]
_CONFIRM = [PhaseTask.CONFIRM3]


def _record_phase(agent: HostAgent, dom: DomainObj) -> Phase | None:
    """Where the job record says the chain has got to (None: no record of this job)."""
    record = agent.jobs.get(dom.uuid)
    if record is None or dom.job is None or record.get("id") != dom.job.id:
        return None
    try:
        return Phase(record.get("phase") or Phase.NONE)
    except ValueError:
        return Phase.NONE


async def _interrupted(agent: HostAgent,
                       dom: DomainObj) -> tuple[MigrationState, list[PhaseTask]] | None:
    """How to continue an interrupted outgoing migration: its state and the phases
    left to send (just confirm3: once Finish has answered), or None."""
    job = dom.job
    if job is None or job.operation != JobOperation.OUTGOING_MIGRATION or job.state is None:
        return None
    st = job.state
    p2p = st.params.has(MigrationFlags.PEER2PEER)
    phase = _record_phase(agent, dom)
    if phase is None:
        return None
    if job.phase == Phase.BEGIN3 and (phase == Phase.BEGIN3 or p2p):
        err = MigrationError(f"the source worker restarted during {phase}", phase, agent.host)
        return st.with_error(err), _TAIL
    if job.phase == Phase.BEGIN3 and phase == Phase.PREPARE:
        job.cancelled = ("the source worker restarted while the dest prepared: the "
                         "migration is cancelled before Perform")
        agent.save_status(dom)
        log.warning("job %s of %s: %s", job.id, dom.name, job.cancelled)
        return None  # the chain goes on by itself and fails at Perform
    if job.phase == Phase.PERFORM3:
        try:
            return await resume_perform(agent, dom, st), _TAIL
        except FerryError as exc:
            return st.with_error(exc.at(phase=Phase.PERFORM3, host=agent.host)), _TAIL
    confirming = phase in (Phase.CONFIRM3, Phase.CONFIRM3_CANCELLED)
    if job.phase == Phase.PERFORM3_DONE and (p2p or confirming):
        return st, _CONFIRM
    return None  # the chain was not waiting on this worker


async def _incoming_interrupted(agent: HostAgent,
                                dom: DomainObj) -> tuple[MigrationState, list[PhaseTask]] | None:
    """A Prepare or Finish whose answer died with this (dest) worker."""
    job = dom.job
    if job is None or job.operation != JobOperation.INCOMING_MIGRATION or job.state is None:
        return None
    phase = _record_phase(agent, dom)
    if phase not in (Phase.PREPARE, Phase.FINISH3):
        return None
    if dom.state == DomainState.RUNNING:
        if phase != Phase.FINISH3:
            return None
        # Finish had started the CPUs: the guest runs here; answer for Finish, and give
        # back the incoming line the Finish task would have (it died with the worker).
        st = complete_incoming(agent, dom, job.state)
        give_back(INCOMING, st.params)
        app.backend.mark_as_done(PhaseTask.FINISH3.task_id(st.params.job_id), st.to_json())
        return st, [] if st.params.has(MigrationFlags.PEER2PEER) else _CONFIRM
    err = MigrationError(f"the dest worker restarted during {phase}", phase, agent.host)
    st = job.state.with_error(err)
    start = PhaseTask.PREPARE3 if phase == Phase.PREPARE else PhaseTask.FINISH3
    if st.params.has(MigrationFlags.PEER2PEER):
        return st, [start]  # the source's task waits for this answer and runs the rest
    return st, list(V3_CHAIN[V3_CHAIN.index(start):])


def resume_interrupted(agent: HostAgent) -> list[str]:
    """Send the rest of every interrupted chain; the job ids it resumed."""
    resumed = []
    for dom in list(agent.domains.values()):
        try:
            found = agent.call(_interrupted(agent, dom), timeout=60) or \
                agent.call(_incoming_interrupted(agent, dom), timeout=60)
        except Exception as exc:
            log.error("domain %s: cannot resume its job: %s", dom.name, exc)
            continue
        if found is None:
            continue
        st, rest = found
        if rest == _CONFIRM:
            threading.Thread(target=_confirm_after_finish, args=(agent, st), daemon=True,
                             name=f"ferry-resume-{st.params.job_id}").start()
        elif rest:
            _send_rest(st, rest)
        resumed.append(st.params.job_id)
        log.warning("job %s of %s: resumed with %s after a restart (%s)", st.params.job_id,
                    dom.name, ",".join(rest),
                    "failed: " + st.error["message"] if st.error else "ok")
    return resumed


def _sig(st: MigrationState, name: PhaseTask, *args: Any) -> Any:
    p = st.params
    queue = queue_for(p.source if name in ON_SOURCE else p.dest)
    task_id = name.task_id(p.job_id)
    if name == PhaseTask.CONFIRM3 and p.has(MigrationFlags.PEER2PEER):
        task_id = PhaseTask.MIGRATE_P2P.task_id(p.job_id)  # the id the p2p caller waits on
    return app.signature(name.task_name, args=args, queue=queue, task_id=task_id)


def _send_rest(st: MigrationState, rest: list[PhaseTask]) -> None:
    """Phases `rest` as a chain, the first given the state."""
    sigs = [_sig(st, rest[0], st.to_json())] + [_sig(st, name) for name in rest[1:]]
    flow: Any = chain(*sigs) if len(sigs) > 1 else sigs[0]
    flow.apply_async()


def _confirm_after_finish(agent: HostAgent, st: MigrationState) -> None:
    """Confirm once Finish has answered; bounded, then the Finish fence decides."""
    p = st.params
    wait = agent.settings.p2p_timeout_s + agent.settings.incoming_timeout_s
    try:
        result = results.wait(app.AsyncResult(PhaseTask.FINISH3.task_id(p.job_id)), wait,
                              propagate=True, disable_sync_subtasks=False)
        st = MigrationState.from_json(result)
    except Exception as exc:
        err = exc if isinstance(exc, FerryError) else HostUnavailableError(
            f"dest host '{p.dest}' did not answer finish3 after the source restarted",
            phase=Phase.FINISH3, host=p.dest, cause=str(exc))
        st = finish_unanswered(agent, st, err)
    _sig(st, PhaseTask.CONFIRM3, st.to_json()).apply_async()
