"""Named failure points in phase code, switched on through FERRY_FAILPOINTS.

    FERRY_FAILPOINTS="finish3.before_cont=raise,prepare3.qemu_argv=bad-arg"

Actions: raise (a QemuError naming the point), kill (the worker dies with
SIGKILL), hang (the phase blocks forever), slow (the phase waits SLOW_S
first), bad-arg (an argv gets an option QEMU refuses, so QEMU really fails
to start).  With the variable unset,
`hit()` is a dict lookup on an empty dict.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping

from workers.errors import QemuError

log = logging.getLogger(__name__)

ACTIONS = ("raise", "kill", "hang", "slow", "bad-arg")
SLOW_S = 3.0
_ACTIVE: dict[str, str] = {}


def configure(spec: str) -> None:
    """Parse `name=action,...` (from settings); unknown actions are refused."""
    _ACTIVE.clear()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        if action not in ACTIONS:
            raise ValueError(f"failpoint {name!r}: action must be one of {ACTIONS}")
        _ACTIVE[name] = action
    if _ACTIVE:
        log.warning("failpoints armed: %s", _ACTIVE)


def active() -> Mapping[str, str]:
    return _ACTIVE


async def hit(name: str) -> None:
    action = _ACTIVE.get(name)
    if action is None or action == "bad-arg":
        return
    log.warning("failpoint %s: %s", name, action)
    if action == "raise":
        raise QemuError(f"failpoint {name} triggered")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "slow":
        await asyncio.sleep(SLOW_S)
        return
    await asyncio.Event().wait()  # hang


def extra_argv(name: str) -> list[str]:
    return ["-ferry-failpoint-bad-option"] if _ACTIVE.get(name) == "bad-arg" else []
