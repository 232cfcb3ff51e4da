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
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workers.confine import Confinement
from workers.devices import Channel
from workers.domain import Serial
from workers.errors import QemuError
from workers.qemu_argv import Handover

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
    argv: Sequence[str], *, pass_fds: Sequence[int], log_path: Path, cwd: Path,
    confinement: Confinement | None = None,
) -> QemuProcess:
    """Start QEMU detached from the worker's session, output to `log_path` (opened by
    the worker), as the confined user when there is one."""
    c = confinement
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
                user=c.uid if c else None,
                group=c.gid if c else None,
                extra_groups=list(c.groups) if c else None,
            )
        except OSError as exc:
            raise QemuError(f"cannot execute {argv[0]}", cause=str(exc)) from exc
    pidfd = os.pidfd_open(popen.pid)
    log.info("started %s pid %d%s", Path(argv[0]).name, popen.pid,
             f" as {confinement.user}" if confinement else "")
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


def open_handover(serials: Sequence[Serial], channels: Sequence[Channel] = ()) -> Handover:
    """The serial log files and unix sockets (serials' and channels') a QEMU uses,
    opened by the worker (as QEMU would open them) so their directories need not be
    open to QEMU's user."""
    files: dict[str, int] = {}
    sockets: dict[str, int] = {}
    chans: dict[int, int] = {}
    try:
        for s in serials:
            if s.type == "file" and s.path:
                how = os.O_APPEND if s.append else os.O_TRUNC
                files[s.alias] = os.open(s.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | how,
                                         0o600)
            elif s.type == "unix" and s.path:
                sockets[s.alias] = _serial_socket(s.path, s.mode == "bind")
        for i, c in enumerate(channels):
            if c.type == "unix" and c.path:
                chans[i] = _serial_socket(c.path, True)
    except OSError as exc:
        close_handover(Handover(files, sockets, chans))
        raise QemuError(f"cannot open {exc.filename or ''}: {exc.strerror}") from None
    return Handover(files, sockets, chans)


def _serial_socket(path: str, bind: bool) -> int:
    """A listening socket at `path` (mode bind), or one connected to it (mode connect)."""
    if bind:
        return listening_socket(Path(path)).detach()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        exc.filename = exc.filename or path
        raise
    return sock.detach()


def close_handover(handover: Handover) -> None:
    """The worker's copies, once QEMU holds its own."""
    for fd in handover.fds():
        with contextlib.suppress(OSError):
            os.close(fd)


def bound_sockets(serials: Sequence[Serial],
                  channels: Sequence[Channel]) -> list[tuple[str, int, int]]:
    """(path, inode, ctime ns) of the unix sockets `open_handover` bound (serials in mode
    bind, unix channels), to remove when their QEMU goes (inode numbers are reused at
    once: the ctime tells a socket bound again apart)."""
    paths = [s.path for s in serials if s.type == "unix" and s.mode == "bind" and s.path]
    paths += [c.path for c in channels if c.type == "unix" and c.path]
    out = []
    for path in paths:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            out.append((path, st.st_ino, st.st_ctime_ns))
    return out


def remove_sockets(bound: Sequence[tuple[str, int, int]]) -> None:
    """Remove the sockets of `bound_sockets` that are still those files."""
    for path, ino, ctime in bound:
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if (st.st_ino, st.st_ctime_ns) == (ino, ctime) and stat.S_ISSOCK(st.st_mode):
                os.unlink(path)
