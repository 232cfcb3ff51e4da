"""Writes that must outlive a failover wait for a replica (Redis WAIT).

Redis replicates asynchronously: the master answers a write before any replica
has it.  When the master's machine is lost, Sentinel promotes a replica, and
whatever that replica had not received yet is gone, although a client was told
it was done.  For most of ferry's writes that is harmless (a heartbeat, progress,
a queue position is written again; a lost task message is redelivered or swept).
For three it is not:

- a lease taken or handed over: a dest that took the disk's lease and started
  the guest, then a failover that drops the lease, and the source (or anyone)
  can take the same disk: two hosts writing one disk;
- the Finish claim: the fence between a dest about to start the CPUs and a
  source that gave up waiting; a dropped claim lets both win;
- the phase change of a job record that starts a step which can still be undone
  (Prepare, Perform): restarted workers and the sweeper decide from it.

Those writes go on one connection followed by `WAIT 1 <FERRY_REPLICA_WAIT_MS>`:
once a replica has acknowledged, the write survives the loss of the master.
When none acknowledges in time the write counts as failed (ReplicaWaitError):
the lease is given back (best effort), the phase fails and the migration takes
its cancelled form, so the source keeps running.

A write can also reach a master that the sentinels have already replaced: a
client keeps its pooled connections to a server until they fail, and a master
the sentinels demoted while it was cut off from them (or judged down by mistake)
still takes writes until they reconfigure it as a replica, which then throws
away everything it took since.  Its WAIT finds no replica (the replicas follow
the new master), so a guarded write whose WAIT was not acknowledged asks the
sentinels which server is the master now: when it is not the one that took the
batch, the idle connections to that one are dropped and the batch runs again on
the current master (within the client's `retry_s`).  Only a current master
without a replica makes the write fail.

The record of a finished job (the job's outcome, the end of its record) must
survive a failover too, but must not fail a job whose guest has moved:
`required=False` waits and follows a new master the same way, and when the
current master has no replica it keeps the write there and logs a warning.

Only with a Sentinel broker URL: a plain redis:// or rediss:// broker fails over
nowhere, so there is nothing to wait for, and a broker without replicas would
fail every such write.  `config.broker.connect` marks its clients accordingly
(`replica_wait_ms`, 0: no WAIT).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from redis.client import Pipeline
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from config.errors import FerryError

log = logging.getLogger(__name__)

REPLICAS = 1  # how many replicas must acknowledge a guarded write


class ReplicaWaitError(FerryError):
    """No replica of the broker acknowledged a write that a failover must not lose."""

    replies: list[Any]


def wait_ms(client: redis.Redis) -> int:
    """How long guarded writes of `client` wait for a replica (0: they do not wait)."""
    return int(getattr(client, "replica_wait_ms", 0) or 0)


class DemotedMasterError(redis.ConnectionError):
    """A batch went to a server the sentinels no longer name as the master (a demoted
    master that has not heard of it yet): what it took will be thrown away."""

    replies: list[Any]  # the batch's replies there, WAIT's last


def _master_now(client: redis.Redis) -> tuple[str, int] | None:
    """The master's address as the sentinels tell it now (None: none is known, or the
    client is not a Sentinel client).  A Sentinel pool that learns of a new master drops
    its idle connections to the old one, so the next command goes to the new one."""
    discover = getattr(client.connection_pool, "get_master_address", None)
    if discover is None:
        return None
    try:
        host, port = discover()
    except (redis.ConnectionError, redis.TimeoutError):  # MasterNotFoundError included
        return None
    return (str(host), int(port))


def follow_master(client: redis.Redis) -> None:
    """Ask the sentinels for the master now (the heartbeat does, every beat): a Sentinel
    pool that learns of a new one drops its idle connections to the old, so even plain
    writes stop going to a demoted master within a beat.  Nothing for other clients."""
    _master_now(client)


def guarded_write(client: redis.Redis, build: Callable[[Pipeline], None],
                  what: str, *, required: bool = True) -> list[Any]:
    """Run the commands `build` queues on one connection, then WAIT for a replica when
    `client` is a Sentinel client; the commands' replies.

    ReplicaWaitError (with `.replies`) when no replica acknowledged in time: the
    write is on the master but may not survive it.  A client that retries while the
    broker is away (`retry_s`) retries the whole batch, as it does single commands,
    and also when the server that took it is no longer the master (DemotedMasterError).
    `required=False`: no error when the current master has no replica; the write stays
    there (a warning says a failover could lose it)."""
    timeout_ms = wait_ms(client)
    retry_s = float(getattr(client, "retry_s", 0) or 0)
    pool = getattr(client, "connection_pool", None)
    sentinel = timeout_ms > 0 and hasattr(pool, "get_master_address")

    def once() -> list[Any]:
        pipe = client.pipeline(transaction=False)
        build(pipe)
        if not timeout_ms:
            return list(pipe.execute())
        pipe.wait(REPLICAS, timeout_ms)
        if not sentinel:
            return list(pipe.execute())
        # the batch's own connection, so the server that took it is known
        assert pool is not None
        conn = pool.get_connection()
        pipe.connection = conn
        replies = list(pipe.execute())
        took = (str(getattr(conn, "host", "")), int(getattr(conn, "port", 0)))
        if int(replies[-1]) < REPLICAS and _master_now(client) != took:
            err = DemotedMasterError(
                f"{what}: {took[0]}:{took[1]} took it without a replica and the sentinels "
                "do not name it the master (a demoted master loses what it takes)")
            err.replies = replies
            raise err
        return replies

    try:
        if retry_s > 0:
            for attempt in Retrying(
                    stop=stop_after_delay(retry_s),
                    wait=wait_random_exponential(multiplier=0.05, max=1.0),
                    retry=retry_if_exception_type((redis.ConnectionError,
                                                   redis.TimeoutError)),
                    before_sleep=before_sleep_log(log, logging.WARNING), reraise=True):
                with attempt:
                    replies = once()
        else:
            replies = once()
    except DemotedMasterError as exc:  # no retries left (or none allowed)
        replies = exc.replies[:-1]
        if required:
            raise _not_acknowledged(what, timeout_ms, replies,
                                    " (the server that took it is no longer the master)"
                                    ) from exc
        log.error("%s; it may be lost", exc)
        return replies
    if not timeout_ms:
        return replies
    acked = int(replies.pop())
    if acked < REPLICAS:
        if not required:
            log.warning("%s: no replica of the broker acknowledged it within %d ms; kept on "
                        "the master, a failover could lose it", what, timeout_ms)
            return replies
        raise _not_acknowledged(what, timeout_ms, replies)
    return replies


def _not_acknowledged(what: str, timeout_ms: int, replies: list[Any],
                      note: str = "") -> ReplicaWaitError:
    err = ReplicaWaitError(
        f"{what}: no replica of the broker acknowledged it within {timeout_ms} ms{note}, so "
        "a failover could lose it; it counts as failed")
    err.replies = replies
    return err
