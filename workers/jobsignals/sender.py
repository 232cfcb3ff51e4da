"""The client's end of job signals: publish on the domain's channel, wait for the owner's reply.

No subscriber (PUBLISH returns 0) and no reply in time are clear errors at
once, never a hang.  An abort nobody can act on now is recorded in the job
record and honoured by the next phase.
"""

from __future__ import annotations

import json
import time
import uuid as uuidlib
from typing import Any

import redis

from workers.errors import FerryError, HostUnavailableError, OperationInvalidError
from workers.jobs import JobStore
from workers.jobsignals.protocol import job_channel, reply_channel


class NoJobOwnerError(OperationInvalidError):
    """Nobody listens on the domain's job channel."""


def send_signal(client: redis.Redis, uuid: str, op: str, args: dict[str, Any] | None = None,
                timeout_s: float = 5.0) -> Any:
    try:
        return _send(client, uuid, op, args, timeout_s)
    except redis.RedisError as exc:  # no master now (a failover), or no broker at all
        raise HostUnavailableError(f"cannot send {op} for domain {uuid}: the broker does not "
                                   f"answer ({exc})") from exc


def _send(client: redis.Redis, uuid: str, op: str, args: dict[str, Any] | None,
          timeout_s: float) -> Any:
    reply_to = reply_channel()
    sig_id = str(uuidlib.uuid4())
    # redis-py leaves Redis.pubsub unannotated
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    try:
        pubsub.subscribe(reply_to)
        sig = {"id": sig_id, "op": op, "args": args or {}, "reply_to": reply_to}
        if client.publish(job_channel(uuid), json.dumps(sig)) == 0:
            raise NoJobOwnerError(f"no job owner listens for domain {uuid}: no job is running")
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            msg = pubsub.get_message(timeout=left)
            if msg is None or msg.get("type") != "message":
                continue
            reply = json.loads(msg["data"])
            if reply.get("id") != sig_id:
                continue
            if not reply.get("ok"):
                raise FerryError(str(reply.get("error") or f"{op} failed"))
            return reply.get("result")
        raise HostUnavailableError(f"the job owner of domain {uuid} did not answer {op} "
                                   f"within {timeout_s:.1f}s")
    finally:
        pubsub.close()


def abort(client: redis.Redis, uuid: str, timeout_s: float = 5.0) -> Any:
    """Abort now, or record the abort for the next phase when no owner listens."""
    try:
        return send_signal(client, uuid, "abort", timeout_s=timeout_s)
    except NoJobOwnerError:
        if JobStore(client, "client").request_abort(uuid):
            return {"aborted": True, "deferred": True}
        raise
