"""The sweeper: periodic (and at start) reconciliation of what a crash can leave.

- an incoming QEMU whose job record is gone (the job ended elsewhere): discarded,
  at once if the job is marked ended (e.g. a p2p source gave up on a dest that
  was cut off, and the dest hears of it only when its link returns), and its
  place in the host's incoming line given back (no Finish will);
- a guest paused by a migration with no job left: never resumed blindly (the
  dest may run it), reported with a clear reason for the operator;
- a job record naming this host as the source while no guest here is in that
  job (its phases were lost with a crash): it would refuse every later job of
  the guest, so once it is past the grace and still so in the next pass (a job
  that is just ending is not mistaken for one), the job is ended and its late
  phases, should they come, run nothing;
- leases need no sweeping: nobody renews a dead owner's, so they expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from workers.jobs import job_key
from workers.migration.state import Phase
from workers.slots import Line, Slots
from workers.states import DomainState, PausedReason, ShutoffReason

if TYPE_CHECKING:
    from workers.agent import HostAgent
    from workers.domobj import DomainObj
    from workers.jobs import ActiveJob

log = logging.getLogger(__name__)

GRACE_S = 30.0  # a job younger than this may simply not have written its record yet


@dataclass
class OrphanRecords:
    """Job records of this host (as the source) that no guest here is in, by pass."""

    suspects: dict[str, str] = field(default_factory=dict)  # uuid -> job id, last pass

    def reconcile(self, agent: HostAgent) -> list[str]:
        mine = {d.uuid: d.job.id for d in agent.domains.values() if d.job is not None}
        now, orphans = time.time(), {}
        for key in agent.redis.scan_iter(match=job_key("*"), count=1000):
            uuid = (key.decode() if isinstance(key, bytes) else key).rsplit(":", 1)[1]
            record = agent.jobs.get(uuid)
            if record is None or record.get("source") != agent.host or \
                    mine.get(uuid) == record["id"] or now - record["started"] <= GRACE_S:
                continue
            orphans[uuid] = str(record["id"])
        done = []
        for uuid, job_id in orphans.items():
            if self.suspects.get(uuid) == job_id:
                agent.jobs.end(uuid, job_id)
                done.append(f"ended job {job_id} of domain {uuid}: its record names this "
                            "host as the source but no guest here is in it")
        self.suspects = {u: j for u, j in orphans.items() if self.suspects.get(u) != j}
        return done


async def sweep(agent: HostAgent, orphans: OrphanRecords | None = None) -> list[str]:
    """One pass; returns what it did, one line each."""
    done = [] if orphans is None else orphans.reconcile(agent)
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
    orphans = OrphanRecords()
    while True:
        with contextlib.suppress(Exception):
            await sweep(agent, orphans)
        await asyncio.sleep(agent.settings.sweep_interval_s)
