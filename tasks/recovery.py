"""A restarted worker picks up the migrations it was in the middle of.

With late acknowledgement a phase that was running when its worker died is
delivered again only after the broker's visibility timeout (hours), so the
worker does not wait for that: for every guest whose status file says it
was in Begin or Perform here, it asks QEMU how far it got (never a second
`migrate`) and sends the rest of the chain itself, Finish to the dest and
Confirm here, under the job's task ids, so the caller waiting on the job
gets its result.  A phase redelivered later finds the job ended and runs
nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import chain

from config.celery_app import app, queue_for
from workers.agent import HostAgent
from workers.domobj import DomainObj
from workers.errors import FerryError, MigrationError
from workers.migration.params import MigrationFlags
from workers.migration.source import resume_perform
from workers.migration.state import MigrationState, Phase

log = logging.getLogger(__name__)


async def _interrupted(agent: HostAgent, dom: DomainObj) -> MigrationState | None:
    """The state to continue an interrupted outgoing migration with, or None."""
    job = dom.job
    if job is None or job.operation != "outgoing_migration" or job.state is None:
        return None
    st = MigrationState.from_json(job.state)
    record = agent.jobs.get(dom.uuid)
    if job.phase == Phase.BEGIN3.value and record and record.get("phase") == "begin3":
        err = MigrationError("the source worker restarted during begin3", "begin3", agent.host)
        return st.with_error(err)
    if job.phase != Phase.PERFORM3.value:
        return None  # the chain was not waiting on this worker
    try:
        return await resume_perform(agent, dom, st)
    except FerryError as exc:
        return st.with_error(exc.at(phase="perform3", host=agent.host))


def resume_interrupted(agent: HostAgent) -> list[str]:
    """Send the rest of every interrupted chain; the job ids it resumed."""
    resumed = []
    for dom in list(agent.domains.values()):
        try:
            st = agent.call(_interrupted(agent, dom), timeout=60)
        except Exception as exc:
            log.error("domain %s: cannot resume its job: %s", dom.name, exc)
            continue
        if st is None:
            continue
        _send_rest(st)
        resumed.append(st.params.job_id)
        log.warning("job %s of %s: resumed after a restart (%s)", st.params.job_id, dom.name,
                    "failed: " + st.error["message"] if st.error else "switch-over done")
    return resumed


def _send_rest(st: MigrationState) -> None:
    p = st.params
    last_id = f"{p.job_id}.migrate_p2p" if p.has(MigrationFlags.PEER2PEER) \
        else f"{p.job_id}.confirm3"
    rest: Any = chain(
        app.signature("ferry.finish3", args=(st.to_json(),), queue=queue_for(p.dest),
                      task_id=f"{p.job_id}.finish3"),
        app.signature("ferry.confirm3", queue=queue_for(p.source), task_id=last_id))
    rest.apply_async()
