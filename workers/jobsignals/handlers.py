"""What each job signal does, on the host that owns the job (the listener calls `dispatch`).

Every handler runs on the agent loop and returns the JSON the sender gets;
a FerryError is the sender's error line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from workers import lifecycle
from workers.agent import HostAgent
from workers.domain_states import DomainState, PausedReason
from workers.domobj import DomainObj
from workers.errors import InvalidInputError, OperationInvalidError
from workers.job_types import TOO_LATE, Phase
from workers.jobs import active_record, jobinfo_view
from workers.migration import qemu_migrate, storage
from workers.migration.params import MAX_BANDWIDTH_MIB_S, MAX_DOWNTIME_MS, MigrationFlags

log = logging.getLogger(__name__)

_BACKGROUND: set[asyncio.Task[None]] = set()  # see _in_background
PERFORM_PHASES = (Phase.PERFORM3, Phase.PERFORM2, Phase.SAVE)  # save: a migration to a file
# Under the sender's 5 s wait (sender.py): a cancel QEMU is slow to finish still gets
# its reply, 'cancelling', instead of the client's 'did not answer'.
ABORT_SETTLE_S = 4.0


async def dispatch(agent: HostAgent, uuid: str, op: str, args: dict[str, Any]) -> Any:
    """Run signal `op` for the job of domain `uuid` on this host; its result."""
    handler = HANDLERS.get(op)
    if handler is None:
        raise InvalidInputError(f"unknown job signal '{op}' (one of {', '.join(HANDLERS)})")
    dom = agent.lookup(uuid)
    if dom.job is None:
        raise OperationInvalidError(f"domain '{dom.name}' has no job on this host")
    log.info("job %s: signal %s %s", dom.job.id, op, args)
    return await handler(agent, dom, args)


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


SWITCHED_PHASES = (Phase.PERFORM3_DONE, Phase.CONFIRM3)


async def _abort(agent: HostAgent, dom: DomainObj, args: dict[str, Any]) -> Any:
    assert dom.job is not None
    if dom.job.phase in SWITCHED_PHASES or str(dom.migration_status).startswith("postcopy"):
        raise OperationInvalidError(TOO_LATE)
    dom.job.abort = True
    job_id = dom.job.id
    loop = asyncio.get_running_loop()
    if not _performing(dom):
        # the record is all a deferred abort has: written before the reply, its error
        # is the reply
        await loop.run_in_executor(None, agent.jobs.request_abort, dom.uuid)
        return {"aborted": True, "phase": dom.job.phase, "deferred": True}
    # Neither path below waits for Redis: the record's mark (for the other host and the
    # later phases) is written in a thread meanwhile.
    copy = dom.storage_out
    if copy is not None and not copy.ram_started:
        # Still copying the disks: Perform's loop sees the abort at once and cancels
        # the mirrors.
        _in_background(_mark(agent, dom, job_id))
        dom.wakeup.set()
        closed = await copy.wait_closed(ABORT_SETTLE_S)
        return {"aborted": True, "phase": dom.job.phase if dom.job else None,
                "status": "cancelled" if closed else "cancelling"}
    # QEMU is told first; the reply goes once it says the migration stopped (a tunnel's
    # closed flag is written in a thread too: Perform's clean-up waits for it).
    _in_background(_cancel(dom))
    await asyncio.sleep(0)  # the cancel goes out before the mark's thread takes the GIL
    _in_background(_mark(agent, dom, job_id))
    status = await _settled(dom, ABORT_SETTLE_S)
    if status == "completed":
        raise OperationInvalidError(TOO_LATE)
    return {"aborted": True, "phase": dom.job.phase if dom.job else None, "status": status}


def _in_background(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(work)
    _BACKGROUND.add(task)  # asyncio holds tasks weakly: keep it until it ends
    task.add_done_callback(_BACKGROUND.discard)


async def _cancel(dom: DomainObj) -> None:
    try:
        await qemu_migrate.cancel(dom)
    except Exception:  # nobody awaits this task: its error goes to the log
        log.exception("domain %s: cancelling the migration failed", dom.name)


async def _mark(agent: HostAgent, dom: DomainObj, job_id: str) -> None:
    """The abort of a running migration stands without the record's mark (QEMU
    cancels, Perform fails); a broker error there is a warning.  Job `job_id`'s record
    alone: by now the next job may have started."""
    try:
        await asyncio.get_running_loop().run_in_executor(None, agent.jobs.mark_aborted,
                                                         dom.uuid, job_id)
    except Exception as exc:
        log.warning("domain %s: abort not marked in the job record: %s", dom.name, exc)


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
    if dom.storage_out is not None:  # the disk copy too, as libvirt
        await dom.storage_out.set_speed(storage.mib_to_speed(mib))
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


Handler = Callable[[HostAgent, DomainObj, dict[str, Any]], Awaitable[Any]]
HANDLERS: dict[str, Handler] = {
    "abort": _abort, "setspeed": _setspeed, "getspeed": _getspeed,
    "setmaxdowntime": _setmaxdowntime, "suspend": _suspend, "postcopy": _postcopy,
    "jobinfo": _jobinfo, "blkstat": _blkstat, "blkinfo": _blkinfo,
}
