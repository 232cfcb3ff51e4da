"""The QMP monitor of one QEMU process, owned by the host agent.

QEMU serves one client per QMP socket, so the agent holds the only
connection and every task talks to QEMU through it.  Events are handed to
a callback as they arrive, whether or not a task is running.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.message import Message

from workers.errors import QemuError

log = logging.getLogger(__name__)

#: (event name, its data, QEMU's timestamp of it in epoch seconds)
EventCallback = Callable[[str, dict[str, Any], float], None]


class _Dispatch(EventListener):
    """Hands each event straight to a callback: no queue, no history kept."""

    def __init__(self, callback: EventCallback) -> None:
        super().__init__()
        self._callback = callback

    async def put(self, event: Message) -> None:
        data = event.get("data") or {}
        self._callback(str(event["event"]), dict(data) if isinstance(data, dict) else {},
                       _timestamp(event.get("timestamp")))


def _timestamp(ts: object) -> float:
    """QEMU's event time (its clock, when the event happened, not when it was read)."""
    if isinstance(ts, dict):
        sec, usec = ts.get("seconds"), ts.get("microseconds")
        if isinstance(sec, int) and isinstance(usec, int) and sec >= 0:
            return sec + usec / 1e6
    return time.time()


class _QuietClient(QMPClient):
    """qemu.qmp renders every message to text for its debug log (`str(msg)`, ~20 µs of
    JSON each) before the logger decides to drop it; render only when it is kept."""

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", msg)
        return msg


class Monitor:
    """One QMP connection with logged commands and an event callback."""

    def __init__(self, name: str, on_event: EventCallback) -> None:
        self.name = name
        self._client = _QuietClient(name)
        self._client.register_listener(_Dispatch(on_event))

    async def connect(self, address: str | socket.socket, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._client.connect(address), timeout)
        except (TimeoutError, OSError, Exception) as exc:
            raise QemuError(
                f"cannot connect to the monitor of {self.name}", cause=str(exc)
            ) from exc

    async def execute(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0,
        oob: bool = False,
    ) -> Any:
        """Run one QMP command; a QEMU error becomes a QemuError naming the command.

        `oob` sends it out of band (exec-oob): QEMU answers it at once, even while an
        in-band command hangs (e.g. `yank` while a drain waits on a stalled peer).
        """
        started = time.monotonic()
        log.debug("qmp %s -> %s%s %s", self.name, cmd, " (oob)" if oob else "", args or {})
        try:
            reply = await asyncio.wait_for(self._client.execute(cmd, args, oob=oob), timeout)
        except ExecuteError as exc:
            log.debug("qmp %s <- %s error %s", self.name, cmd, exc.error_class)
            raise QemuError(f"QEMU refused {cmd}: {exc}", cause=exc.error_class) from exc
        except TimeoutError as exc:
            raise QemuError(f"QEMU did not answer {cmd} within {timeout:.0f}s") from exc
        except Exception as exc:
            raise QemuError(f"monitor of {self.name} failed during {cmd}", cause=str(exc)) from exc
        log.debug(
            "qmp %s <- %s %.1fms %s", self.name, cmd, (time.monotonic() - started) * 1000, reply
        )
        return reply

    async def execute_raw(self, text: str, timeout: float = 30.0) -> Any:
        """Run a command given as JSON text (qemu-monitor-command passthrough)."""
        msg = Message(text.encode())
        log.debug("qmp %s -> raw %s", self.name, text)
        try:
            return await asyncio.wait_for(self._client.execute_msg(msg), timeout)
        except ExecuteError as exc:
            raise QemuError(
                f"QEMU refused the command: {exc}", cause=exc.error_class
            ) from exc
        except TimeoutError as exc:
            raise QemuError(f"QEMU did not answer within {timeout:.0f}s") from exc

    def send_fd(self, fd: int) -> None:
        """Queue an fd for the next command (SCM_RIGHTS), for getfd/add-fd."""
        self._client.send_fd_scm(fd)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._client.disconnect(), 5.0)
        except Exception as exc:  # the process may already be gone
            log.debug("qmp %s: disconnect: %s", self.name, exc)
