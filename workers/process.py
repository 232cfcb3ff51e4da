"""QEMU processes that outlive the worker.

QEMU runs in its own session with its stdout/stderr in a log file, so a
worker that dies (even by SIGKILL) takes no guest with it.  The worker
watches every QEMU through a pidfd: it becomes readable the moment the
process exits, whether or not the worker is its parent, so exit is seen at
once even when PID 1 reaps the zombie late.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workers.errors import QemuError

log = logging.getLogger(__name__)

# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass
class QemuProcess:
    """A running QEMU: its pid, a pidfd to watch it, and the Popen if we are its parent."""

    pid: int
    pidfd: int
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def reap(self) -> int | None:
        """Collect the exit status when we are the parent; None otherwise."""
        if self.popen is None:
            return None
        return self.popen.poll()

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, signum)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        self.pidfd = -1


def listening_socket(path: Path) -> socket.socket:
    """A bound, listening unix socket handed to QEMU for its monitor.

    Connecting to it succeeds at once (the kernel queues the connection) and
    the QMP greeting arrives when QEMU is ready, so nobody polls for a socket
    file to appear.
    """
    text = str(path)
    if len(text.encode()) > MAX_SOCKET_PATH:
        raise QemuError(f"socket path too long for a unix socket ({len(text)} bytes): {text}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(text)
        sock.listen(4)
    except OSError:
        sock.close()
        raise
    return sock


def spawn(
    argv: Sequence[str], *, pass_fds: Sequence[int], log_path: Path, cwd: Path
) -> QemuProcess:
    """Start QEMU detached from the worker's session, output to `log_path`."""
    with open(log_path, "ab") as out:
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
                pass_fds=tuple(pass_fds),
                close_fds=True,
            )
        except OSError as exc:
            raise QemuError(f"cannot execute {argv[0]}", cause=str(exc)) from exc
    pidfd = os.pidfd_open(popen.pid)
    log.info("started %s pid %d", Path(argv[0]).name, popen.pid)
    return QemuProcess(popen.pid, pidfd, popen)


def attach(pid: int, must_contain: str) -> QemuProcess | None:
    """Adopt a QEMU left by an earlier worker, if `pid` still is that QEMU.

    The command line must contain `must_contain` (the guest's uuid) so a
    recycled pid is never mistaken for the guest.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = _proc_state(pid)
    except OSError:
        os.close(pidfd)
        return None
    if must_contain.encode() not in cmdline or state == "Z":
        os.close(pidfd)
        return None
    return QemuProcess(pid, pidfd, None)


def _proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def log_tail(path: Path, limit: int = 400) -> str:
    """The end of a QEMU log, one line, for error messages."""
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-3:])
