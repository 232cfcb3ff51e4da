"""Named failure points in phase code, switched on through FERRY_FAILPOINTS.

    FERRY_FAILPOINTS="finish3.before_cont=raise,prepare3.qemu_argv=bad-arg"

Actions: raise (a QemuError naming the point), kill (the worker dies with
SIGKILL), hang (the phase blocks forever), slow (the phase waits SLOW_S
first), bad-arg (an argv gets an option QEMU refuses, so QEMU really fails
to start), pause (the phase waits until the arming is taken back).

A test that needs to arm points while a worker runs (the fault matrix, one
worker for many cases) sets FERRY_FAILPOINT_DIR: a file `<dir>/<name>`
holding an action arms point `name`; a point that pauses writes
`<dir>/<name>.hit` (the test's event that the phase is there) and goes on
once the file is removed.  With both settings unset, `hit()` is a dict
lookup on an empty dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from workers.errors import QemuError

log = logging.getLogger(__name__)

ACTIONS = ("raise", "kill", "hang", "slow", "bad-arg", "pause")
SLOW_S = 3.0
PAUSE_POLL_S = 0.02
_ACTIVE: dict[str, str] = {}
_DIR: list[Path] = []  # empty: no run-time arming


def configure(spec: str, directory: str = "") -> None:
    """Parse `name=action,...` (from settings); unknown actions are refused."""
    _ACTIVE.clear()
    _DIR.clear()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        if action not in ACTIONS:
            raise ValueError(f"failpoint {name!r}: action must be one of {ACTIONS}")
        _ACTIVE[name] = action
    if directory:
        _DIR.append(Path(directory))
    if _ACTIVE or _DIR:
        log.warning("failpoints armed: %s%s", _ACTIVE,
                    f", and at run time from {directory}" if directory else "")


def active() -> Mapping[str, str]:
    return _ACTIVE


def _armed(name: str) -> str | None:
    action = _ACTIVE.get(name)
    if action is None and _DIR:
        with contextlib.suppress(OSError):
            action = (_DIR[0] / name).read_text().strip() or None
    return action


async def hit(name: str) -> None:
    action = _armed(name)
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
    if action == "pause" and _DIR:
        await _pause(name)
        return
    await asyncio.Event().wait()  # hang


async def _pause(name: str) -> None:
    armed, marker = _DIR[0] / name, _DIR[0] / f"{name}.hit"
    marker.write_text(str(os.getpid()))
    while armed.exists():
        await asyncio.sleep(PAUSE_POLL_S)
    log.warning("failpoint %s: released", name)


def extra_argv(name: str) -> list[str]:
    return ["-ferry-failpoint-bad-option"] if _armed(name) == "bad-arg" else []
