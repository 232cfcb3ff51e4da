"""Job signals: the job owner listens on `ferry.job.<domain uuid>` and replies.

Runs on the agent loop with an asyncio Redis connection, so handlers use the
QMP monitor directly, while Perform's wait loop goes on.  The source host
subscribes for the whole job (Begin to Confirm): an abort before Perform is
recorded and honoured at the next phase boundary, one during Perform
cancels QEMU's migration at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import redis

from config import broker
from workers import lifecycle
from workers.domobj import DomainObj
from workers.errors import FerryError, InvalidInputError, OperationInvalidError
from workers.jobs import active_record, jobinfo_view
from workers.migration import qemu_migrate
from workers.migration.params import MAX_BANDWIDTH_MIB_S, MAX_DOWNTIME_MS, MigrationFlags
from workers.states import DomainState, PausedReason

if TYPE_CHECKING:
    from workers.agent import HostAgent

log = logging.getLogger(__name__)

PERFORM_PHASES = ("perform3", "perform2", "save")  # save: a migration to a file
ABORT_SETTLE_S = 5.0


def job_channel(uuid: str) -> str:
    return f"ferry.job.{uuid}"


class SignalListener:
    def __init__(self, agent: HostAgent) -> None:
        self.agent = agent
        self.redis = broker.connect_async(agent.settings)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # A permanent subscription keeps the reader alive between jobs.
        await self.pubsub.subscribe(f"ferry.host.{self.agent.host}")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()
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
        channels = channels or [f"ferry.host.{self.agent.host}"]
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
            result = await self.dispatch(channel.rsplit(".", 1)[1], str(sig.get("op")), args)
            reply: dict[str, Any] = {"id": sig_id, "ok": True, "result": result}
        except FerryError as exc:
            reply = {"id": sig_id, "ok": False, "error": str(exc.at(host=self.agent.host))}
        except Exception as exc:  # the caller gets an answer, never silence
            log.exception("job signal %s failed", sig.get("op"))
            reply = {"id": sig_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        await self.redis.publish(reply_to, json.dumps(reply))

    async def dispatch(self, uuid: str, op: str, args: dict[str, Any]) -> Any:
        handler = HANDLERS.get(op)
        if handler is None:
            raise InvalidInputError(f"unknown job signal '{op}' (one of {', '.join(HANDLERS)})")
        dom = self.agent.lookup(uuid)
        if dom.job is None:
            raise OperationInvalidError(f"domain '{dom.name}' has no job on this host")
        log.info("job %s: signal %s %s", dom.job.id, op, args)
        return await handler(self.agent, dom, args)


def _int_arg(args: dict[str, Any], key: str, low: int, high: int) -> int:
    """An integer argument in [low, high]; JSON true, 1.5 or "100" are refused."""
    value = args.get(key)
    if type(value) is not int:
        raise InvalidInputError(f"signal needs an integer '{key}'")
    if not low <= value <= high:
        raise InvalidInputError(f"'{key}' must be in {low}..{high}, not {value}")
    return value


def _performing(dom: DomainObj) -> bool:
    return dom.job is not None and dom.job.phase in PERFORM_PHASES and dom.monitor is not None


TOO_LATE = "too late to abort: the switch-over happened, the migration goes on to the dest"
SWITCHED_PHASES = ("perform3_done", "confirm3")


async def _abort(agent: HostAgent, dom: DomainObj, args: dict[str, Any]) -> Any:
    assert dom.job is not None
    if dom.job.phase in SWITCHED_PHASES:
        raise OperationInvalidError(TOO_LATE)
    dom.job.abort = True
    agent.jobs.request_abort(dom.uuid)
    if _performing(dom):
        await qemu_migrate.cancel(dom)
        status = await _settled(dom, ABORT_SETTLE_S)
        if status == "completed":
            raise OperationInvalidError(TOO_LATE)
        return {"aborted": True, "phase": dom.job.phase if dom.job else None,
                "status": status}
    return {"aborted": True, "phase": dom.job.phase, "deferred": True}


async def _settled(dom: DomainObj, within: float) -> str | None:
    """QEMU's migration status once it has left the active states (bounded wait), so
    the abort reply says the migration really stopped."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if not dom.active or dom.migration_status in ("cancelled", "failed", "completed"):
            return dom.migration_status
        await asyncio.sleep(0.002)
    return dom.migration_status


async def _setspeed(agent: HostAgent, dom: DomainObj, args: dict[str, Any]) -> Any:
    assert dom.job is not None
    mib = _int_arg(args, "bandwidth", 0, MAX_BANDWIDTH_MIB_S)
    dom.job.bandwidth_mib_s = mib
    if _performing(dom):
        assert dom.monitor is not None
        await dom.monitor.execute("migrate-set-parameters",
                                  {"max-bandwidth": qemu_migrate.mib_to_bytes(mib)})
    return {"bandwidth": mib}


async def _getspeed(agent: HostAgent, dom: DomainObj, args: dict[str, Any]) -> Any:
    assert dom.job is not None
    if dom.monitor is not None:
        params = await dom.monitor.execute("query-migrate-parameters")
        raw = int(params.get("max-bandwidth", 0))
        return {"bandwidth": 0 if raw >= qemu_migrate.UNLIMITED else raw // (1024 * 1024)}
    return {"bandwidth": dom.job.bandwidth_mib_s or 0}


async def _setmaxdowntime(agent: HostAgent, dom: DomainObj, args: dict[str, Any]) -> Any:
    assert dom.job is not None
    ms = _int_arg(args, "downtime", 1, MAX_DOWNTIME_MS)
    dom.job.max_downtime_ms = ms
    if _performing(dom):
        assert dom.monitor is not None
        await dom.monitor.execute("migrate-set-parameters", {"downtime-limit": ms})
    return {"downtime": ms}


async def _suspend(agent: HostAgent, dom: DomainObj, args: dict[str, Any]) -> Any:
    if dom.state == DomainState.RUNNING:
        await lifecycle.pause_cpus(agent, dom, PausedReason.MIGRATION)
    return {"state": dom.state.value, "reason": dom.reason.value}


async def _postcopy(agent: HostAgent, dom: DomainObj, args: dict[str, Any]) -> Any:
    assert dom.job is not None
    if not dom.job.flags & MigrationFlags.POSTCOPY:
        raise OperationInvalidError("post-copy was not enabled for this migration (--postcopy)")
    if not _performing(dom):
        raise OperationInvalidError("post-copy can start only while Perform runs")
    assert dom.monitor is not None
    await dom.monitor.execute("migrate-start-postcopy")
    return {"postcopy": True}


async def _jobinfo(agent: HostAgent, dom: DomainObj, args: dict[str, Any]) -> Any:
    assert dom.job is not None
    return jobinfo_view(active_record(dom.job), agent.host)


async def _blkstat(agent: HostAgent, dom: DomainObj, args: dict[str, Any]) -> Any:
    return await lifecycle.domblkstat(agent, dom.name, args.get("device"))


async def _blkinfo(agent: HostAgent, dom: DomainObj, args: dict[str, Any]) -> Any:
    return await lifecycle.domblkinfo(agent, dom.name, str(args.get("device") or ""))


Handler = Callable[["HostAgent", DomainObj, dict[str, Any]], Awaitable[Any]]
HANDLERS: dict[str, Handler] = {
    "abort": _abort, "setspeed": _setspeed, "getspeed": _getspeed,
    "setmaxdowntime": _setmaxdowntime, "suspend": _suspend, "postcopy": _postcopy,
    "jobinfo": _jobinfo, "blkstat": _blkstat, "blkinfo": _blkinfo,
}
