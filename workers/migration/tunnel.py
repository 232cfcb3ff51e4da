"""Tunnelled migration: QEMU's stream through the broker, with bounded memory.

The source QEMU writes to one end of a socketpair (handed over with
SCM_RIGHTS); a sender thread reads whole chunks from the other end and
pushes them onto a Redis list.  A receiver thread on the dest pops them and
writes them into the incoming QEMU's socketpair, acknowledging each chunk.
The sender never has more than `window` bytes unacknowledged, so Redis holds
at most a few MiB per migration whatever the guest size (backpressure
both ways: a slow dest stops the sender, a full socket stops QEMU).

Keys (all deleted at the end):  ferry:tunnel:<job>:data  chunks, b"" = end
                                ferry:tunnel:<job>:ack   one length per chunk
                                ferry:tunnel:<job>:closed  set by either side
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import socket
import threading
import time

import redis

from config import broker
from config.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often blocked pops look at the stop flags
IDLE_LIMIT_S = 60.0  # no progress at all for this long ends the tunnel


def _keys(job_id: str) -> tuple[str, str, str]:
    base = f"ferry:tunnel:{job_id}"
    return f"{base}:data", f"{base}:ack", f"{base}:closed"


class _Pump(threading.Thread):
    def __init__(self, name: str, settings: Settings, job_id: str,
                 sock: socket.socket) -> None:
        super().__init__(name=name, daemon=True)
        self.redis = broker.connect(settings, socket_timeout=10)
        self.job_id = job_id
        self.sock = sock
        self.data_key, self.ack_key, self.closed_key = _keys(job_id)
        self.stop_event = threading.Event()
        self.error: str | None = None
        self.bytes = 0

    def closed(self) -> bool:
        return self.stop_event.is_set() or bool(self.redis.exists(self.closed_key))

    def close(self) -> None:
        """Close our end first (QEMU's writes or reads then fail at once), then flag it."""
        self.stop_event.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(redis.RedisError):
            self.redis.set(self.closed_key, "1", ex=300)

    def finish(self, timeout: float) -> None:
        self.join(timeout)
        if self.is_alive():
            self.close()
            self.join(5)
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(redis.RedisError):
            self.cleanup()
        self.redis.close()

    def cleanup(self) -> None:
        """The sender leaves its data for the receiver; keys expire in any case."""
        for key in (self.data_key, self.ack_key, self.closed_key):
            self.redis.expire(key, 300)

    def pump(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        _name_native_thread(b"ferry-tunnel")
        try:
            self.pump()
        except (OSError, redis.RedisError, TimeoutError) as exc:
            if not self.stop_event.is_set():
                self.error = f"{self.name}: {exc}"
                log.warning("tunnel %s: %s", self.job_id, self.error)
                self.close()


class TunnelSender(_Pump):
    def __init__(self, settings: Settings, job_id: str, sock: socket.socket, *, window: int,
                 chunk: int) -> None:
        super().__init__("tunnel-send", settings, job_id, sock)
        self.window, self.chunk = window, chunk
        self.inflight = 0

    def read_full(self, buf: memoryview) -> int:
        """Fill `buf` unless the stream ends: a short read is not the end."""
        got = 0
        while got < len(buf):
            n = self.sock.recv_into(buf[got:])
            if n == 0:
                break
            got += n
        return got

    def pump(self) -> None:
        buf = bytearray(self.chunk)
        view = memoryview(buf)
        while not self.stop_event.is_set():
            n = self.read_full(view)
            if n:
                self.wait_credit(n)
                self.redis.rpush(self.data_key, bytes(view[:n]))
                self.inflight += n
                self.bytes += n
            if n < self.chunk:
                self.redis.rpush(self.data_key, b"")
                return

    def wait_credit(self, n: int) -> None:
        last = time.monotonic()
        while self.inflight + n > self.window:
            item = self.redis.blpop([self.ack_key], timeout=POLL_S)
            if item is not None:
                self.inflight -= int(item[1])
                last = time.monotonic()
            elif self.closed():
                raise OSError("tunnel closed by the other side")
            elif time.monotonic() - last > IDLE_LIMIT_S:
                raise TimeoutError(f"no acknowledgement for {IDLE_LIMIT_S:.0f}s")


class TunnelReceiver(_Pump):
    def __init__(self, settings: Settings, job_id: str, sock: socket.socket) -> None:
        super().__init__("tunnel-recv", settings, job_id, sock)
        self.done = threading.Event()

    def cleanup(self) -> None:
        self.redis.delete(self.data_key, self.ack_key, self.closed_key)

    def pump(self) -> None:
        while not self.stop_event.is_set():
            item = self.redis.blpop([self.data_key], timeout=POLL_S)
            if item is None:
                if self.closed():
                    raise OSError("tunnel closed by the other side")
                continue
            data = item[1]
            assert isinstance(data, bytes)
            if not data:
                self.done.set()
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
                return
            self.sock.sendall(data)
            self.bytes += len(data)
            self.redis.rpush(self.ack_key, len(data))


def _name_native_thread(name: bytes) -> None:
    """Name the OS thread (/proc/PID/task/TID/comm) so leftovers can be seen from outside."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.prctl(15, name, 0, 0, 0)  # PR_SET_NAME


def reset(client: redis.Redis, job_id: str) -> None:
    """Forget any leftovers of an earlier attempt of this job."""
    client.delete(*_keys(job_id))
