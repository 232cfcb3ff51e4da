"""The two ends of a tunnel: each side's pumps (workers/migration/tunnel.py) as one.

Single stream: each QEMU gets one end of a socketpair (SCM_RIGHTS, `fd:`), as
before --parallel existed.  Parallel: QEMU's multifd opens its connections
itself, so `fd:` cannot carry it (an fd is one connection).  The source
worker listens on a unix socket in its state directory and QEMU migrates to
`unix:` it, opening the main channel first and then one per multifd channel;
each connection accepted is the next channel.  The dest QEMU listens on a
unix socket in the dest's state directory, and the dest worker connects a
channel when its first data arrives, every lower channel first: QEMU 7.2
takes the first connection it accepts as the main channel (not by content).

Either way channel 0 also carries the return path back to the source.
Closing either end shuts every socket of it down, so QEMU sees at once that
its stream is gone (then `migrate_cancel` lands even if QEMU was blocked on
a full socket).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
from pathlib import Path

from config.settings import Settings
from workers.migration import tunnel

log = logging.getLogger(__name__)

ACCEPT_POLL_S = 0.2


def socket_path(run_dir: Path, kind: str, job_id: str) -> Path:
    """A short unix socket name for a job (its id may be any string a caller chose)."""
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:16]
    return run_dir / f"{kind}-{digest}.sock"


class _Ends:
    """The pumps of one side; error and bytes as one tunnel."""

    def __init__(self) -> None:
        self.pumps: list[tunnel._Pump] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def _add(self, pump: tunnel._Pump) -> None:
        with self.lock:
            self.pumps.append(pump)
        pump.start()

    def _data_pumps(self) -> list[tunnel._Pump]:
        with self.lock:
            return [p for p in self.pumps if p.thread_name == tunnel.THREAD_NAME]

    @property
    def error(self) -> str | None:
        with self.lock:
            return next((p.error for p in self.pumps if p.error), None)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self._data_pumps())

    def close(self) -> None:
        self.stopped.set()
        with self.lock:
            pumps = list(self.pumps)
        for pump in pumps:
            pump.close()


class SourceEnds(_Ends):
    """QEMU's connections in (one sender each), the return path out on channel 0."""

    def __init__(self, settings: Settings, job_id: str, *, channels: int) -> None:
        super().__init__()
        self.settings, self.job_id, self.channels = settings, job_id, channels
        self.window = settings.tunnel_window_mib << 20
        self.chunk = settings.tunnel_chunk_kib << 10
        self.listener: socket.socket | None = None
        self.path: Path | None = None
        self.acceptor: threading.Thread | None = None

    def attach(self, sock: socket.socket) -> None:
        """The next channel: a socket QEMU writes to (the socketpair, or accepted)."""
        i = len(self._data_pumps())
        self._add(tunnel.TunnelSender(self.settings, self.job_id, sock, window=self.window,
                                      chunk=self.chunk, channel=i, on_error=self.close))
        if i == 0:
            self._add(tunnel.BackReceiver(self.settings, self.job_id, sock,
                                          on_error=self.close))

    def listen(self, path: Path, owner: tuple[int, int] | None = None) -> str:
        """Listen where QEMU will connect its channels; the URI for `migrate`.  `owner`:
        the confined QEMU user's (uid, gid), given the socket (it connects as them)."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            os.chmod(path, 0o600)
            if owner is not None:
                os.chown(path, *owner)
            listener.listen(self.channels)
            listener.settimeout(ACCEPT_POLL_S)
        except OSError:
            listener.close()
            raise
        self.listener, self.path = listener, path
        self.acceptor = threading.Thread(target=self._accept, name="tunnel-accept",
                                         daemon=True)
        self.acceptor.start()
        return f"unix:{path}"

    def _accept(self) -> None:
        assert self.listener is not None
        while len(self._data_pumps()) < self.channels and not self.stopped.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            tunnel.widen(sock)
            self.attach(sock)
        self._unlisten()

    def _unlisten(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def close(self) -> None:
        super().close()
        self._unlisten()

    def finish(self, timeout: float) -> None:
        """After QEMU's end: the senders drain what QEMU wrote, then the return path
        (which has nothing more to carry once QEMU closed channel 0) is woken, then
        the sockets close."""
        if self.acceptor is not None:
            self.acceptor.join(timeout)
        self._unlisten()
        _finish_in_order(self.pumps, self.lock, timeout)


class DestEnds(_Ends):
    """One receiver per channel into the dest QEMU, the return path out of channel 0."""

    def __init__(self, settings: Settings, job_id: str, *, channels: int,
                 sock: socket.socket | None = None, path: Path | None = None) -> None:
        super().__init__()
        self.settings, self.job_id = settings, job_id
        self.path = path
        self.socks: list[socket.socket] = []
        self.connect_lock = threading.Lock()
        window = settings.tunnel_window_mib << 20
        self.receivers = [tunnel.TunnelReceiver(settings, job_id, sock if i == 0 else None,
                                                channel=i, connect=self._connect,
                                                on_error=self.close, window=window)
                          for i in range(channels)]
        self.back = tunnel.BackSender(settings, job_id, lambda: self.receivers[0].sock,
                                      on_error=self.close)

    def start(self) -> None:
        for receiver in self.receivers:
            self._add(receiver)
        self._add(self.back)

    @property
    def done(self) -> threading.Event:
        return self.receivers[0].done

    def _connect(self, channel: int) -> socket.socket:
        """Channel `channel`'s socket, connecting every lower channel first, in order."""
        with self.connect_lock:
            while len(self.socks) <= channel:
                if self.stopped.is_set():
                    raise OSError("tunnel closed")
                assert self.path is not None
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    tunnel.widen(sock)
                    sock.connect(str(self.path))
                except OSError:
                    sock.close()
                    raise
                self.socks.append(sock)
                self.receivers[len(self.socks) - 1].sock = sock
            return self.socks[channel]

    def finish(self, timeout: float) -> None:
        """After the incoming migration: the receivers have written the end, the return
        path stops reading (the dest QEMU said all it had to say before it completed)."""
        for receiver in self.receivers:
            receiver.join(timeout)
        self.back.close()
        _finish_in_order(self.pumps, self.lock, timeout)
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _finish_in_order(pumps: list[tunnel._Pump], lock: threading.Lock, timeout: float) -> None:
    """Data pumps joined, then the return path's pump finished, then the data pumps'
    sockets closed: channel 0's socket is shared by both directions."""
    with lock:
        data = [p for p in pumps if p.thread_name == tunnel.THREAD_NAME]
        back = [p for p in pumps if p.thread_name != tunnel.THREAD_NAME]
    for pump in data:
        pump.join(timeout)
    for pump in back:
        pump.finish(timeout)
    for pump in data:
        pump.finish(timeout)
