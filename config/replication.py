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


def guarded_write(client: redis.Redis, build: Callable[[Pipeline], None],
                  what: str) -> list[Any]:
    """Run the commands `build` queues on one connection, then WAIT for a replica when
    `client` is a Sentinel client; the commands' replies.

    ReplicaWaitError (with `.replies`) when no replica acknowledged in time: the
    write is on the master but may not survive it.  A client that retries while the
    broker is away (`retry_s`) retries the whole batch, as it does single commands."""
    timeout_ms = wait_ms(client)
    retry_s = float(getattr(client, "retry_s", 0) or 0)

    def once() -> list[Any]:
        pipe = client.pipeline(transaction=False)
        build(pipe)
        if timeout_ms:
            pipe.wait(REPLICAS, timeout_ms)
        return list(pipe.execute())

    if retry_s > 0:
        for attempt in Retrying(
                stop=stop_after_delay(retry_s),
                wait=wait_random_exponential(multiplier=0.05, max=1.0),
                retry=retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
                before_sleep=before_sleep_log(log, logging.WARNING), reraise=True):
            with attempt:
                replies = once()
    else:
        replies = once()
    if not timeout_ms:
        return replies
    acked = int(replies.pop())
    if acked < REPLICAS:
        err = ReplicaWaitError(
            f"{what}: no replica of the broker acknowledged it within {timeout_ms} ms, so "
            "a failover could lose it; it counts as failed")
        err.replies = replies
        raise err
    return replies
