"""The sweeper: periodic (and at start) reconciliation of what a crash can leave.

- an incoming QEMU whose job record is gone (the job ended elsewhere): discarded,
  at once if the job is marked ended (e.g. a p2p source gave up on a dest that
  was cut off, and the dest hears of it only when its link returns), and its
  place in the host's incoming line given back (no Finish will);
- a guest paused by a migration with no job left: never resumed blindly (the
  dest may run it), reported with a clear reason for the operator;
- leases need no sweeping: nobody renews a dead owner's, so they expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from workers.migration.state import Phase
from workers.slots import Line, Slots
from workers.states import DomainState, PausedReason, ShutoffReason

if TYPE_CHECKING:
    from workers.agent import HostAgent
    from workers.domobj import DomainObj
    from workers.jobs import ActiveJob

log = logging.getLogger(__name__)

GRACE_S = 30.0  # a job younger than this may simply not have written its record yet


async def sweep(agent: HostAgent) -> list[str]:
    """One pass; returns what it did, one line each."""
    done = []
    now = time.time()
    for dom in list(agent.domains.values()):
        job = dom.job
        if job is not None and _waiting_incoming(dom, job) and \
                _gone(agent, dom.uuid, job.id, now - job.started):
            async with dom.lock:
                if not _waiting_incoming(dom, job):
                    continue  # Finish began meanwhile: it decides
                await agent.kill(dom, ShutoffReason.FAILED)
            dom.job = None
            agent.release_ports(dom)
            Slots(agent.redis, agent.host).give_back(Line.IN.value, job.id)
            done.append(f"discarded incoming {dom.name}: its job {job.id} is gone")
        elif job is None and dom.state == DomainState.PAUSED and \
                dom.reason == PausedReason.MIGRATION:
            done.append(f"{dom.name} stays paused: a migration paused it and ended; check "
                        "where it runs before resuming it")
    for line in done:
        log.warning("sweeper: %s", line)
    return done


def _waiting_incoming(dom: DomainObj, job: ActiveJob) -> bool:
    """An incoming guest Prepare made and no Finish has begun on (a Finish in progress
    decides itself: it may have won the fence and be starting the CPUs)."""
    return job.operation == "incoming_migration" and dom.active and dom.job is job and \
        job.phase == Phase.PREPARE.value


def _gone(agent: HostAgent, uuid: str, job_id: str, age_s: float) -> bool:
    """The job of an incoming guest is over: marked ended, or (past the grace) its
    record is gone or belongs to another job."""
    if agent.jobs.ended(job_id):
        return True
    if age_s <= GRACE_S:
        return False
    record = agent.jobs.get(uuid)
    return record is None or record.get("id") != job_id


async def run_forever(agent: HostAgent) -> None:
    while True:
        with contextlib.suppress(Exception):
            await sweep(agent)
        await asyncio.sleep(agent.settings.sweep_interval_s)
