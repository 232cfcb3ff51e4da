"""Peer-to-peer migration: one task on the source queue drives every phase.

The source runs Begin, Perform and Confirm itself and asks the dest for
Prepare and Finish by sending those tasks to the dest's queue, with the same
states, cookies and error rules as a managed chain.  Every wait on the dest
is bounded.  If Finish does not answer in time, a fence in the job record
decides: if the source claims it first, the dest will never start the CPUs
and the source resumes; if the dest claimed it, the outcome is unknown and
the guest stays paused here rather than risk running twice.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout

from config.celery_app import app, queue_for
from config.replication import ReplicaWaitError
from tasks import results
from tasks.checked import task
from tasks.migration import (
    OUTGOING,
    aborted_in_line,
    chain_result,
    give_back,
    progress_reporter,
    run_phase,
    wait_turn,
)
from tasks.phase_tasks import PhaseTask
from workers.agent import HostAgent, get_agent
from workers.errors import FerryError, HostUnavailableError, MigrationError
from workers.heartbeat import get_host
from workers.job_types import Phase
from workers.lifecycle import dumpxml
from workers.migration import source
from workers.migration.chain_state import MigrationState
from workers.migration.params import MigrationParams

log = logging.getLogger(__name__)


def _remote(agent: HostAgent, name: PhaseTask, st: MigrationState,
            **kwargs: Any) -> MigrationState:
    """Run phase task `name` on the dest and wait, bounded, for its state."""
    p = st.params
    timeout = agent.settings.p2p_timeout_s
    err: FerryError
    if get_host(agent.redis, p.dest) is None:
        err = HostUnavailableError(f"dest host '{p.dest}' is not alive", phase=name,
                                   host=p.dest)
    else:
        result = app.send_task(name.task_name, args=(st.to_json(),), kwargs=kwargs,
                               queue=queue_for(p.dest), task_id=name.task_id(p.job_id))
        try:
            return MigrationState.from_json(results.wait(result, timeout, propagate=True,
                                                         disable_sync_subtasks=False))
        except CeleryTimeout:
            err = HostUnavailableError(f"dest host '{p.dest}' did not answer {name} within "
                                       f"{timeout}s", phase=name, host=p.dest)
        except FerryError as exc:
            err = exc
        except Exception as exc:
            err = MigrationError(f"{name} on {p.dest} failed: {exc}", phase=name,
                                 host=p.dest)
    if name == PhaseTask.FINISH3:
        return finish_unanswered(agent, st, err)
    return st.with_error(err)


def finish_unanswered(agent: HostAgent, st: MigrationState, err: FerryError) -> MigrationState:
    p = st.params
    uuid = agent.call(_uuid(agent, p.domain))
    try:
        winner = agent.jobs.claim_finish(uuid, p.job_id, "source")
    except ReplicaWaitError:  # a failover may lose our claim: the dest may yet win it
        winner = "unknown"
    if winner in ("source", "none"):
        return st.with_error(err)  # the dest can no longer start the guest: resume here
    err = MigrationError(f"{err.message}; the dest may have started the guest, so it stays "
                         "paused on the source until an operator decides",
                         Phase.FINISH3, p.dest, err.cause)
    return replace(st, outcome_unknown=True).with_error(err)


async def _uuid(agent: HostAgent, domain: str) -> str:
    return agent.lookup(domain).uuid


def run_p2p(task: Any, p: MigrationParams) -> MigrationState:
    agent = get_agent()
    report = progress_reporter(task)
    if p.protocol == 3:
        st = run_phase(source.begin3, Phase.BEGIN3, MigrationState(params=p))
        st = _remote(agent, PhaseTask.PREPARE3, st)
        st = run_phase(source.perform3, Phase.PERFORM3, st, report)
        st = _remote(agent, PhaseTask.FINISH3, st)
        return run_phase(source.confirm3, Phase.CONFIRM3, st)
    try:
        xml = agent.call(dumpxml(agent, p.domain, migratable=True))
    except FerryError as exc:
        raise exc.at(phase=Phase.PERFORM2, host=agent.host) from None
    st = _remote(agent, PhaseTask.PREPARE2, MigrationState(params=p, xml=xml))
    st = run_phase(source.perform2, Phase.PERFORM2, st, report)
    return _remote(agent, PhaseTask.FINISH2, st, last=False)


@task(PhaseTask.MIGRATE_P2P, bind=True, max_retries=None)
def migrate_p2p(self: Any, params: dict[str, Any]) -> dict[str, Any]:
    p = MigrationParams.from_json(params)  # checked before it takes a place in line
    if not wait_turn(self, OUTGOING, p):
        st = run_phase(aborted_in_line, Phase.BEGIN3 if p.protocol == 3 else Phase.PERFORM2,
                       MigrationState(params=p))
        return chain_result(st)
    try:
        st = run_p2p(self, p)
    finally:
        give_back(OUTGOING, p)
    return chain_result(st)



