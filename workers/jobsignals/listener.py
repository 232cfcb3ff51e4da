"""The job owner's end of job signals: it listens on `ferry.job.<domain uuid>` and replies.

Runs on the agent loop with an asyncio Redis connection, so handlers use the
QMP monitor directly, while Perform's wait loop goes on.  The source host
subscribes for the whole job (Begin to Confirm): an abort before Perform is
recorded and honoured at the next phase boundary, one during Perform
cancels QEMU's migration at once.  What each operation does is handlers.py,
handed to `start` by whoever wires the host (workers/host.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from config import broker
from config.settings import Settings
from workers.errors import FerryError, InvalidInputError
from workers.jobsignals.protocol import host_channel, job_channel

log = logging.getLogger(__name__)

# (domain uuid, op, args) -> the result the sender gets
Dispatch = Callable[[str, str, dict[str, Any]], Awaitable[Any]]


class SignalListener:
    def __init__(self, settings: Settings) -> None:
        self.host = settings.host
        self.redis = broker.connect_async(settings)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self._dispatch: Dispatch | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, dispatch: Dispatch) -> None:
        """Listen, answering every signal with `dispatch` (on the running loop)."""
        self._dispatch = dispatch
        # A permanent subscription keeps the reader alive between jobs.
        await self.pubsub.subscribe(host_channel(self.host))
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py
            await self.redis.aclose()

    async def watch(self, uuid: str) -> None:
        await self.pubsub.subscribe(job_channel(uuid))

    async def unwatch(self, uuid: str) -> None:
        with contextlib.suppress(redis.RedisError):
            await self.pubsub.unsubscribe(job_channel(uuid))

    async def _run(self) -> None:
        while True:
            try:
                msg = await self.pubsub.get_message(timeout=1.0)
            except (redis.RedisError, OSError, RuntimeError) as exc:
                # RuntimeError: redis-py's word for a pubsub that never got a connection
                log.warning("job signal listener: %s; reconnecting", exc)
                await self._resubscribe()
                continue
            if msg is not None and msg.get("type") == "message":
                asyncio.get_running_loop().create_task(self._handle(msg))

    async def _resubscribe(self) -> None:
        """After the broker came back, or its master moved (Sentinel): listen again on
        every channel we had, trying every second until a master answers (a failover
        takes the sentinels' down-after time and more)."""
        channels = [c.decode() if isinstance(c, bytes) else c for c in self.pubsub.channels]
        channels = channels or [host_channel(self.host)]
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(redis.RedisError, OSError):
                await self.pubsub.reset()
            self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await self.pubsub.subscribe(*channels)
            except (redis.RedisError, OSError) as exc:
                log.warning("job signal listener: not subscribed yet: %s", exc)
                continue
            log.info("job signal listener: listening again on %d channel(s)", len(channels))
            return

    async def _handle(self, msg: dict[str, Any]) -> None:
        channel = msg["channel"].decode()
        try:
            sig = json.loads(msg["data"])
            reply_to, sig_id = str(sig["reply_to"]), sig.get("id")
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed job signal on %s", channel)
            return
        try:
            args = sig.get("args") or {}
            if not isinstance(args, dict):
                raise InvalidInputError("job signal args must be a JSON object")
            assert self._dispatch is not None  # set by start() before any message
            result = await self._dispatch(channel.rsplit(".", 1)[1], str(sig.get("op")), args)
            reply: dict[str, Any] = {"id": sig_id, "ok": True, "result": result}
        except FerryError as exc:
            reply = {"id": sig_id, "ok": False, "error": str(exc.at(host=self.host))}
        except Exception as exc:  # the caller gets an answer, never silence
            log.exception("job signal %s failed", sig.get("op"))
            reply = {"id": sig_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        await self.redis.publish(reply_to, json.dumps(reply))
