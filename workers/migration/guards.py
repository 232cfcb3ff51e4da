"""Rules both ends of a migration (and the sweeper) apply: refuse v2 when the leases keep
state, end a job at a phase boundary when it was aborted, and end the source's part."""

from __future__ import annotations

import time

from workers.agent import HostAgent
from workers.domobj import DomainObj
from workers.errors import MigrationError, UnsupportedError
from workers.job_types import JobOperation
from workers.migration.chain_state import MigrationState


def refuse_v2_with_lease_state(agent: HostAgent) -> None:
    if agent.locks.keeps_state:
        raise UnsupportedError("lock manager requires migration protocol v3")


def check_abort(agent: HostAgent, dom: DomainObj | None, uuid: str, job_id: str) -> None:
    """At a phase boundary: an abort recorded earlier ends the job here."""
    job = dom.job if dom is not None else None
    if job is not None and job.cancelled:
        raise MigrationError(job.cancelled)
    if (job is not None and job.abort) or agent.jobs.abort_requested(uuid, job_id):
        raise MigrationError("operation aborted: migration job canceled by client")


def end_outgoing_job(agent: HostAgent, dom: DomainObj, uuid: str, st: MigrationState,
            end_record: bool = True) -> None:
    """The source's part of a job is over; v2 leaves the record to Finish2."""
    p = st.params
    job, dom.job = dom.job, None
    agent.loop.create_task(agent.signals.unwatch(uuid))
    elapsed = int((time.time() - job.started) * 1000) if job else 0
    info = {"id": p.job_id, "operation": JobOperation.OUTGOING_MIGRATION, "source": p.source,
            "dest": p.dest, "type": "failed" if st.failed else "completed",
            "time_elapsed_ms": elapsed, "statistics": st.statistics, "error": st.error}
    if st.error:
        agent.jobs.set_error(uuid, p.job_id, st.error)
    if end_record:  # the outcome and the record's end in one batch (workers/jobs.py)
        agent.jobs.end(uuid, p.job_id, outcome=(agent.host, info))
    else:
        agent.jobs.complete(uuid, agent.host, info)
