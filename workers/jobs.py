"""Job records in Redis: one per domain while a job runs, completed ones kept.

    ferry:job:<domain uuid>              hash: id, kind, phase, source, dest, flags,
                                         started, progress (JSON), error (JSON), abort
    ferry:jobdone:<domain uuid>:<host>   JSON: the completed job as that host saw it
    ferry:queued:<domain uuid>           JSON: a migration waiting for a slot (workers/
                                         slots.py): id, line, place, since; short TTL,
                                         refreshed by every retry of the waiting task
    ferry:jobended:<job id>              the job has ended (its late phases run nothing)
    ferry:tunnel:<job id>:*              a tunnelled job's stream (workers/migration/
                                         tunnel.py): deleted when the job ends

Each field is written on its own (HSET), so the phase task and the progress
loop never overwrite each other's fields.  `set_phase` is the one place a
job's phase changes, and it logs the change.  With a Sentinel broker, the phase
changes that start a step which can still be undone (WAITED_PHASES) and the
Finish claim wait for a replica (config/replication.py) and fail without one; a
job's end (its outcome and the record's end, one batch) waits too, and stays on a
master without a replica rather than fail a job that is over.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.client import Pipeline

from config.replication import guarded_write
from workers.errors import OperationInvalidError
from workers.job_types import SWITCHED_OVER, TOO_LATE, JobOperation, Phase
from workers.migration.chain_state import MigrationState

log = logging.getLogger(__name__)

DONE_TTL_S = 30 * 24 * 3600
QUEUED_TTL_S = 5  # a waiting task refreshes it every 250 ms; gone soon after the waiter
QUEUED_ABORT_TTL_S = 3600  # an abort of a waiting migration outlives any wait in line
# Phase changes a failover must not lose (Sentinel): the steps before the switch-over,
# whose failure still leaves the guest running on the source.  The later ones are
# fenced by the Finish claim and the leases, and must not fail a guest already moved.
WAITED_PHASES = frozenset({Phase.PREPARE, Phase.PERFORM3, Phase.PERFORM2})


#: Work done at the switch-over point, with the guest stopped on the source and QEMU waiting
#: before it sends the last of the state (`pause-before-switchover`); an error cancels the
#: migration and the source resumes (the storage copy's own step there is `at_switchover`).
SwitchoverHook = Callable[[], Awaitable[None]]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def job_key(uuid: str) -> str:
    return f"ferry:job:{uuid}"


def done_key(uuid: str, host: str) -> str:
    return f"ferry:jobdone:{uuid}:{host}"


def queued_key(uuid: str) -> str:
    return f"ferry:queued:{uuid}"


def queued_abort_key(job_id: str) -> str:
    return f"ferry:queuedabort:{job_id}"


def ended_key(job_id: str) -> str:
    return f"ferry:jobended:{job_id}"


def tunnel_keys(job_id: str) -> tuple[str, str, str]:
    """A tunnelled job's stream: data, acknowledgements, the closed flag."""
    base = f"ferry:tunnel:{job_id}"
    return f"{base}:data", f"{base}:ack", f"{base}:closed"


def tunnel_channel_keys(job_id: str, channel: int) -> tuple[str, str]:
    """Data and acknowledgements of a tunnel's channel; channel 0 is the single stream's
    (a parallel migration's main connection), channel i >= 1 a multifd connection's."""
    if channel == 0:
        return tunnel_keys(job_id)[:2]
    base = f"ferry:tunnel:{job_id}:{channel}"
    return f"{base}:data", f"{base}:ack"


def tunnel_back_key(job_id: str) -> str:
    """A tunnel's return path, dest to source."""
    return f"ferry:tunnel:{job_id}:back"


def tunnel_channels_key(job_id: str) -> str:
    """How many channels a parallel tunnel has (so the job's end finds them all)."""
    return f"ferry:tunnel:{job_id}:channels"


def tunnel_error_key(job_id: str) -> str:
    """Why a tunnelled job's stream broke (kept for the later phases to quote)."""
    return f"ferry:tunnel:{job_id}:error"


@dataclass
class ActiveJob:
    """The job a domain is in, as the host that runs a phase of it knows it.

    Signals change the knobs; the wait loop reads them every turn.
    """

    id: str
    operation: JobOperation
    phase: Phase
    started: float
    source: str = ""
    dest: str = ""
    flags: int = 0
    abort: bool = False
    progress: dict[str, Any] = field(default_factory=dict)
    bandwidth_mib_s: int | None = None  # set by setspeed, applied when Perform runs
    max_downtime_ms: int | None = None  # set by setmaxdowntime: the schedule stops
    # The migration state this host last returned (or was given): what a redelivered
    # phase answers again, and what a restarted worker resumes the chain from.
    state: MigrationState | None = None
    # Why the job may not go on (a restarted source worker found it past Begin, the chain
    # with the dest): the next phase here fails with this text.
    cancelled: str = ""
    # Run in order at QEMU's pre-switchover point (qemu_migrate.switch_over); not kept in
    # the status file: a restarted worker cancels a migration it finds there.
    switchover_hooks: list[SwitchoverHook] = field(default_factory=list)

    _KEPT = ("id", "operation", "phase", "started", "source", "dest", "flags", "state",
             "cancelled")

    def to_status(self) -> str:
        data = {k: getattr(self, k) for k in self._KEPT}
        data["state"] = None if self.state is None else self.state.to_json()
        return json.dumps(data)

    @classmethod
    def from_status(cls, text: str) -> ActiveJob:
        data = json.loads(text)
        kept = {k: data[k] for k in cls._KEPT if k in data}
        kept["operation"] = JobOperation(kept["operation"])
        kept["phase"] = Phase(kept["phase"])
        if kept.get("state") is not None:
            kept["state"] = MigrationState.from_json(kept["state"])
        return cls(**kept)


class JobStore:
    def __init__(self, client: redis.Redis, host: str) -> None:
        self.redis = client
        self.host = host
        self._start_script = client.register_script(self._START)
        self._set_mine_script = client.register_script(self._SET_MINE)
        self._end_script = client.register_script(self._END)
        self._claim_script = client.register_script(self._CLAIM)
        self._aborted_script = client.register_script(self._ABORTED)

    # One round trip each (the worker's job bookkeeping sits on every phase's path):
    # the id check and the write happen in Redis, atomically.
    _START = """
    local current = redis.call('HGET', KEYS[1], 'id')
    if current and current ~= ARGV[1] then return current end
    redis.call('HSET', KEYS[1], 'id', ARGV[1], unpack(ARGV, 2))
    return false
    """

    def start(self, uuid: str, *, job_id: str, kind: str, phase: Phase, source: str,
              dest: str | None, flags: int) -> None:
        """Create the record; a record of another job for this domain is a clear error."""
        fields = {"kind": kind, "phase": phase, "source": source, "dest": dest or "",
                  "flags": flags, "started": time.time(), "progress": "{}", "error": ""}
        other = self._start_script(keys=[job_key(uuid)],
                                   args=[job_id, *[str(x) for kv in fields.items() for x in kv]])
        if other is not None:
            raise OperationInvalidError(f"domain {uuid} already has job {_text(other)}")
        log.info("job %s (%s): started in phase %s on %s", job_id, kind, phase, self.host)

    def get(self, uuid: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(job_key(uuid))
        if not raw:
            return None
        rec: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
        rec["progress"] = json.loads(rec.get("progress") or "{}")
        rec["error"] = json.loads(rec["error"]) if rec.get("error") else None
        rec["flags"] = int(rec.get("flags") or 0)
        rec["started"] = float(rec.get("started") or 0)
        return rec

    _SET_MINE = """
    if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return false end
    local old = redis.call('HGET', KEYS[1], ARGV[2])
    if ARGV[4] == '1' and old and old ~= '' then return old end
    redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
    return old or ''
    """

    def _set_mine(self, uuid: str, job_id: str, field: str, value: str,
                  only_empty: bool = False, waited: bool = False) -> str | None:
        """Set `field` if the record is this job's (and, only_empty, if the field is
        empty); the old value, or None when the record is another job's or gone.
        `waited`: a write a failover must not lose (ReplicaWaitError without a replica)."""
        keys = [job_key(uuid)]
        args = [job_id, field, value, "1" if only_empty else "0"]
        if waited:
            [old] = guarded_write(
                self.redis, lambda pipe: self._set_mine_script(keys=keys, args=args,
                                                               client=pipe),
                f"job {job_id}'s change to phase {value}")
        else:
            old = self._set_mine_script(keys=keys, args=args)
        return None if old is None else _text(old)

    def set_phase(self, uuid: str, job_id: str, phase: Phase) -> None:
        old = self._set_mine(uuid, job_id, "phase", phase, waited=phase in WAITED_PHASES)
        if old is not None:
            log.info("job %s: phase %s -> %s on %s", job_id, old or "none", phase, self.host)

    def set_progress(self, uuid: str, job_id: str, progress: dict[str, Any]) -> None:
        self._set_mine(uuid, job_id, "progress", json.dumps(progress))

    # The check and the mark in one step: a mark never lands on a record ended
    # meanwhile (a half record the next job would inherit) nor on the next job's.
    _MARK_ABORT = """
    if ARGV[1] == '' then
        if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
    elseif redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then
        return 0
    end
    redis.call('HSET', KEYS[1], 'abort', '1')
    return 1
    """

    def mark_aborted(self, uuid: str, job_id: str = "") -> bool:
        """Mark the job of domain `uuid` aborted in its record: job `job_id`'s only, when
        given (written after the abort's reply, it may come late), else any job's."""
        # EVAL, not a registered script: one round trip even the first time
        return bool(self.redis.eval(self._MARK_ABORT, 1, job_key(uuid), job_id))

    def request_abort(self, uuid: str) -> bool:
        """Mark the job aborted in its record (honoured at the next phase boundary), or
        a migration still waiting in line before its first phase (it leaves the line).
        A record past the switch-over (v2's Finish: nobody owns the job) is refused: no
        later phase would honour the mark, and the guest goes on to the dest."""
        job_id, phase = self.redis.hmget(job_key(uuid), ["id", "phase"])
        if job_id is not None:
            if phase is not None and _text(phase) in SWITCHED_OVER:
                raise OperationInvalidError(TOO_LATE)
            if self.mark_aborted(uuid, _text(job_id)):  # still that job's record
                return True
        waiting = self.queued(uuid)
        if waiting is None:
            return False
        self.redis.set(queued_abort_key(str(waiting["id"])), "1", ex=QUEUED_ABORT_TTL_S)
        return True

    def abort_requested(self, uuid: str, job_id: str) -> bool:
        return bool(self._aborted_script(keys=[job_key(uuid), queued_abort_key(job_id)],
                                         args=[job_id]))

    # Asked at every phase boundary: the record's abort mark, or one left while queued.
    _ABORTED = """
    local rec = redis.call('HMGET', KEYS[1], 'id', 'abort')
    if rec[1] == ARGV[1] and rec[2] == '1' then return 1 end
    return redis.call('EXISTS', KEYS[2])
    """

    _CLAIM = """
    if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 'none' end
    redis.call('HSETNX', KEYS[1], 'finish_claim', ARGV[2])
    return redis.call('HGET', KEYS[1], 'finish_claim')
    """

    def claim_finish(self, uuid: str, job_id: str, who: str) -> str:
        """Fence for Finish: the first of 'dest' (about to start the CPUs) and 'source'
        (gave up waiting) wins; 'none' when the job is gone.  Atomic in Redis; with a
        Sentinel broker, ReplicaWaitError when no replica has the claim (then neither
        side may act on it)."""
        [winner] = guarded_write(
            self.redis, lambda pipe: self._claim_script(keys=[job_key(uuid)],
                                                        args=[job_id, who], client=pipe),
            f"the Finish claim of job {job_id} by the {who}")
        return _text(winner)

    def set_error(self, uuid: str, job_id: str, error: dict[str, Any]) -> None:
        """The job's first error; a later one does not replace it."""
        self._set_mine(uuid, job_id, "error", json.dumps(error), only_empty=True)

    def complete(self, uuid: str, host: str, info: dict[str, Any]) -> None:
        """Keep what `host` saw of a finished job (domjobinfo --completed); with a
        Sentinel broker, on a master with a replica (config/replication.py)."""
        guarded_write(self.redis, lambda pipe: self._set_done(pipe, uuid, host, info),
                      f"the outcome of job {info.get('id')} on {host}", required=False)

    @staticmethod
    def _set_done(client: redis.Redis | Pipeline, uuid: str, host: str,
                  info: dict[str, Any]) -> None:
        client.set(done_key(uuid, host), json.dumps(info), ex=DONE_TTL_S)

    def completed(self, uuid: str, host: str) -> dict[str, Any] | None:
        raw = self.redis.get(done_key(uuid, host))
        return None if raw is None else dict(json.loads(raw))

    def set_queued(self, uuid: str, info: dict[str, Any]) -> None:
        """Mark a migration of this domain waiting in a line; `since` is kept from the
        first mark of the same job."""
        old = self.queued(uuid)
        since = old["since"] if old and old.get("id") == info["id"] else time.time()
        self.redis.set(queued_key(uuid), json.dumps({**info, "since": since}),
                       ex=QUEUED_TTL_S)

    def queued(self, uuid: str) -> dict[str, Any] | None:
        raw = self.redis.get(queued_key(uuid))
        return None if raw is None else dict(json.loads(raw))

    def clear_queued(self, uuid: str, job_id: str) -> None:
        old = self.queued(uuid)
        if old is not None and old.get("id") == job_id:
            self.redis.delete(queued_key(uuid))

    def ended(self, job_id: str) -> bool:
        """Whether this job ended (a stale redelivery of one of its phases must not run)."""
        return bool(self.redis.exists(ended_key(job_id)))

    # The job's stream goes with it, whichever end of the tunnel ended it; a pump still
    # running then deletes what it writes after (workers/migration/tunnel.py).
    _END = """
    redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
    redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
    local channels = tonumber(redis.call('GET', KEYS[8]) or '1') or 1
    for i = 1, math.min(channels, 256) - 1 do
        redis.call('DEL', ARGV[3] .. ':' .. i .. ':data', ARGV[3] .. ':' .. i .. ':ack')
    end
    redis.call('DEL', KEYS[8])
    if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
    return redis.call('DEL', KEYS[1])
    """

    def end(self, uuid: str, job_id: str,
            outcome: tuple[str, dict[str, Any]] | None = None) -> None:
        """End the record (and mark the job ended); `outcome`, (host, info): what that host
        saw of it, kept in the same batch (`complete`).  With a Sentinel broker the batch
        waits for a replica and follows a new master, as a guarded write does, without
        failing for want of one: a job whose record came back after a failover would
        refuse the guest's next job until the sweeper ends it again, its outcome gone."""
        keys = [job_key(uuid), ended_key(job_id), *tunnel_keys(job_id),
                tunnel_error_key(job_id), tunnel_back_key(job_id), tunnel_channels_key(job_id)]
        args: list[str | int] = [job_id, DONE_TTL_S, f"ferry:tunnel:{job_id}"]

        def build(pipe: Pipeline) -> None:
            if outcome is not None:
                self._set_done(pipe, uuid, *outcome)
            self._end_script(keys=keys, args=args, client=pipe)

        replies = guarded_write(self.redis, build, f"the end of job {job_id}", required=False)
        if replies[-1]:
            log.info("job %s: ended on %s", job_id, self.host)


#: domjobinfo's stream fields, named as in the statistics (workers/migration/stream_stats.py;
#: compression_* are libvirt's xbzrle names)
STREAM_FIELDS = ("parallel_connections", "compression_methods", "compression_cache",
                 "compression_bytes", "compression_pages", "compression_cache_misses",
                 "compression_cache_hits", "compression_overflow", "stream_bytes",
                 "guest_pause_ms")


def active_record(job: ActiveJob) -> dict[str, Any]:
    """An in-memory job as a record for jobinfo_view (what the job owner answers)."""
    return {"id": job.id, "kind": job.operation.kind, "phase": job.phase,
            "source": job.source, "dest": job.dest,
            "started": job.started, "progress": job.progress, "error": None}


def jobinfo_view(record: dict[str, Any] | None, host: str, *, completed: bool = False,
                 now: float | None = None,
                 queued: dict[str, Any] | None = None) -> dict[str, Any]:
    """domjobinfo's fields from an active record or a completed one, as `host` sees it;
    a migration waiting for a slot (`queued`) shows phase 'queued', its line and place."""
    view: dict[str, Any] = {
        "type": "none", "operation": None, "phase": None, "time_elapsed_ms": None,
        "data_total": None, "data_processed": None, "data_remaining": None,
        "disk_total": None, "disk_processed": None, "disk_remaining": None, "disk_bps": None,
        "memory_bps": None, "memory_dirty_rate": None, "memory_iteration": None,
        "downtime_ms": None, "setup_time_ms": None, "error": None, "id": None,
        "queue": None, "queue_position": None, **dict.fromkeys(STREAM_FIELDS),
    }
    if queued is not None and not completed and (
            record is None or record.get("id") == queued.get("id")):
        return _queued_view(view, record, queued, host, now or time.time())
    if record is None:
        return view
    if completed:
        stats = record.get("statistics") or {}
        view.update(type=record.get("type", "completed"), operation=record.get("operation"),
                    time_elapsed_ms=record.get("time_elapsed_ms"), id=record.get("id"),
                    error=(record.get("error") or {}).get("message"))
    else:
        stats = record.get("progress") or {}
        kind = record.get("kind")
        operation = kind
        if kind == "migration":
            operation = _direction(host, record.get("source"))
        elapsed = ((now or time.time()) - float(record.get("started") or 0)) * 1000
        view.update(type="unbounded", operation=operation, phase=record.get("phase"),
                    time_elapsed_ms=int(elapsed), id=record.get("id"),
                    error=(record.get("error") or {}).get("message"))
    view.update(
        data_total=_data(stats, "total"), data_processed=_data(stats, "processed"),
        data_remaining=_data(stats, "remaining"), disk_total=stats.get("disk_total"),
        disk_processed=stats.get("disk_processed"),
        disk_remaining=stats.get("disk_remaining"), disk_bps=stats.get("disk_bps"),
        memory_bps=stats.get("memory_bps"),
        memory_dirty_rate=stats.get("memory_dirty_rate"),
        memory_iteration=stats.get("memory_iteration"), downtime_ms=stats.get("downtime"),
        setup_time_ms=stats.get("setup_time"))
    view.update({k: stats.get(k) for k in STREAM_FIELDS})
    return view


def _data(stats: dict[str, Any], what: str) -> int | None:
    """libvirt's data_*: memory plus disks (a storage copy's mirrors)."""
    mem, disk = stats.get(f"memory_{what}"), stats.get(f"disk_{what}")
    if mem is None and disk is None:
        return None
    return int(mem or 0) + int(disk or 0)


def _queued_view(view: dict[str, Any], record: dict[str, Any] | None,
                 queued: dict[str, Any], host: str, now: float) -> dict[str, Any]:
    started = float((record or {}).get("started") or queued.get("since") or now)
    view.update(type="unbounded", operation=_direction(host, queued.get("source")),
                phase=Phase.QUEUED, id=queued.get("id"),
                time_elapsed_ms=int((now - started) * 1000), queue=queued.get("line"),
                queue_position=queued.get("place"))
    return view


def _direction(host: str, source: object) -> JobOperation:
    """Which end of a migration `host` is, by the source the record names."""
    return JobOperation.OUTGOING_MIGRATION if host == source else \
        JobOperation.INCOMING_MIGRATION
