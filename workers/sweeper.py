"""The sweeper: periodic (and at start) reconciliation of what a crash can leave.

- an incoming QEMU whose job record is gone (the job ended elsewhere): discarded;
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

from workers.states import DomainState, PausedReason, ShutoffReason

if TYPE_CHECKING:
    from workers.agent import HostAgent

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 30.0
GRACE_S = 30.0  # a job younger than this may simply not have written its record yet


async def sweep(agent: HostAgent) -> list[str]:
    """One pass; returns what it did, one line each."""
    done = []
    now = time.time()
    for dom in list(agent.domains.values()):
        job = dom.job
        if job is not None and job.operation == "incoming_migration" and dom.active and \
                now - job.started > GRACE_S and agent.jobs.get(dom.uuid) is None:
            async with dom.lock:
                await agent.kill(dom, ShutoffReason.FAILED)
            dom.job = None
            agent.release_ports(dom)
            done.append(f"discarded incoming {dom.name}: its job {job.id} is gone")
        elif job is None and dom.state == DomainState.PAUSED and \
                dom.reason == PausedReason.MIGRATION:
            done.append(f"{dom.name} stays paused: a migration paused it and ended; check "
                        "where it runs before resuming it")
    for line in done:
        log.warning("sweeper: %s", line)
    return done


async def run_forever(agent: HostAgent) -> None:
    while True:
        with contextlib.suppress(Exception):
            await sweep(agent)
        await asyncio.sleep(SWEEP_INTERVAL_S)
