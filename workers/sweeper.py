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
- the other way round, a guest here in an outgoing job that waits for another
  host (after Begin, or after Perform) while the job's record is gone (a
  broker that lost its data): the job is ended by the same rule, and its
  places in the admission lines (pair, out, and the dest's in) are given back;
  a guest the migration paused stays paused and is reported as below;
- leases need no sweeping: nobody renews a dead owner's, so they expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from workers.agent import HostAgent
from workers.domain_states import DomainState, PausedReason, ShutoffReason
from workers.domobj import DomainObj
from workers.errors import MigrationError
from workers.job_types import JobOperation, Phase
from workers.jobs import ActiveJob, job_key
from workers.migration import storage_dest, storage_keep
from workers.migration.guards import end_outgoing_job
from workers.slots import Line, Slots, give_back_all

log = logging.getLogger(__name__)


@dataclass
class Orphans:
    """The two halves of a source's job that can lose each other in a crash: a job
    record with no guest here in that job, and a guest here in a job with no record
    (a broker that lost its data).  Either is acted on only when two passes in a row
    find it so, so a job that is just ending is not mistaken for one."""

    suspects: dict[tuple[str, str], str] = field(default_factory=dict)  # -> job id

    def reconcile(self, agent: HostAgent) -> list[str]:
        records = _records(agent)
        found = {**_records_without_job(agent, records), **_jobs_without_record(agent, records)}
        done = []
        for (kind, key), job_id in found.items():
            if self.suspects.get((kind, key)) != job_id:
                continue
            if kind == "record":
                agent.jobs.end(key, job_id)
                rec = records[key]  # no Confirm or Finish will give its lines back
                give_back_all(agent.redis, job_id, agent.host, str(rec.get("dest") or ""))
                done.append(f"ended job {job_id} of domain {key}: its record names this "
                            "host as the source but no guest here is in it")
            elif (dom := agent.domains.get(key)) is not None and dom.job is not None and \
                    dom.job.id == job_id:
                _end_lost_job(agent, dom)
                done.append(f"ended job {job_id} of {key}: its record and phases are "
                            "gone from the broker")
        self.suspects = {k: j for k, j in found.items() if self.suspects.get(k) != j}
        return done


def _records(agent: HostAgent) -> dict[str, dict[str, Any]]:
    """Every job record in the broker, by domain uuid (read once per pass)."""
    records = {}
    for key in agent.redis.scan_iter(match=job_key("*"), count=1000):
        uuid = (key.decode() if isinstance(key, bytes) else key).rsplit(":", 1)[1]
        if (record := agent.jobs.get(uuid)) is not None:
            records[uuid] = record
    return records


def _records_without_job(agent: HostAgent,
                         records: dict[str, dict[str, Any]]) -> dict[tuple[str, str], str]:
    """("record", uuid) -> job id."""
    mine = {d.uuid: d.job.id for d in agent.domains.values() if d.job is not None}
    now, grace = time.time(), agent.settings.sweep_grace_s
    return {("record", uuid): str(rec["id"]) for uuid, rec in records.items()
            if rec.get("source") == agent.host and mine.get(uuid) != rec["id"] and
            now - rec["started"] > grace}


# An outgoing job in these phases waits for another host; no phase of it runs here.
_WAITING = (Phase.BEGIN3, Phase.PERFORM3_DONE)


def _jobs_without_record(agent: HostAgent,
                         records: dict[str, dict[str, Any]]) -> dict[tuple[str, str], str]:
    """("job", domain name) -> job id."""
    now, found, grace = time.time(), {}, agent.settings.sweep_grace_s
    for name, dom in agent.domains.items():
        job = dom.job
        if job is None or job.operation != JobOperation.OUTGOING_MIGRATION or job.state is None or \
                job.phase not in _WAITING or now - job.started <= grace:
            continue  # (an offline migration keeps no state to end it from)
        record = records.get(dom.uuid)
        if record is None or record.get("id") != job.id:
            found[("job", name)] = job.id
    return found


def _end_lost_job(agent: HostAgent, dom: DomainObj) -> None:
    """End the source's part: a guest the migration paused stays paused (the dest may
    run it; the pass below reports it), any other is left as it is."""
    job = dom.job
    assert job is not None and job.state is not None
    err = MigrationError("the job's record and phases are gone from the broker (it lost "
                         "its data?): the sweeper ended the job", job.phase, agent.host)
    end_outgoing_job(agent, dom, dom.uuid, job.state.with_error(err))
    p = job.state.params  # no Confirm or Finish will give the job's lines back
    give_back_all(agent.redis, job.id, p.source, p.dest)
    if dom.active:
        agent.save_status(dom)


async def sweep(agent: HostAgent, orphans: Orphans | None = None) -> list[str]:
    """One pass; returns what it did, one line each."""
    done: list[str] = []
    if orphans is not None:
        try:
            done = orphans.reconcile(agent)
        except Exception as exc:  # the rest of the pass still runs
            log.error("sweeper: job records not reconciled: %s", exc)
    now = time.time()
    for dom in list(agent.domains.values()):
        job = dom.job
        if job is not None and _waiting_incoming(dom, job) and \
                _gone(agent, dom.uuid, job.id, now - job.started):
            async with dom.lock:
                if not _waiting_incoming(dom, job):
                    continue  # Finish began meanwhile: it decides
                await agent.kill(dom, ShutoffReason.FAILED)
            storage_dest.discard_images(agent, job.id)
            dom.job = None
            agent.release_ports(dom)
            Slots(agent.redis, agent.host).give_back(Line.IN.value, job.id)
            done.append(f"discarded incoming {dom.name}: its job {job.id} is gone")
        elif job is None and dom.state == DomainState.PAUSED and \
                dom.reason == PausedReason.MIGRATION:
            done.append(f"{dom.name} stays paused: a migration paused it and ended; check "
                        "where it runs before resuming it")
    done += storage_dest.sweep_images(agent, agent.jobs.ended, lambda name: _runs(agent, name))
    done += storage_keep.sweep(agent)
    for line in done:
        log.warning("sweeper: %s", line)
    return done


def _runs(agent: HostAgent, name: str) -> bool:
    dom = agent.domains.get(name)
    return dom is not None and dom.active


def _waiting_incoming(dom: DomainObj, job: ActiveJob) -> bool:
    """An incoming guest Prepare made and no Finish has begun on (a Finish in progress
    decides itself: it may have won the fence and be starting the CPUs)."""
    return job.operation == JobOperation.INCOMING_MIGRATION and dom.active and \
        dom.job is job and job.phase == Phase.PREPARE


def _gone(agent: HostAgent, uuid: str, job_id: str, age_s: float) -> bool:
    """The job of an incoming guest is over: marked ended, or (past the grace) its
    record is gone or belongs to another job."""
    if agent.jobs.ended(job_id):
        return True
    if age_s <= agent.settings.sweep_grace_s:
        return False
    record = agent.jobs.get(uuid)
    return record is None or record.get("id") != job_id


async def run_forever(agent: HostAgent) -> None:
    orphans = Orphans()
    while True:
        with contextlib.suppress(Exception):
            await sweep(agent, orphans)
        await asyncio.sleep(agent.settings.sweep_interval_s)
