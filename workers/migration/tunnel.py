"""Tunnelled migration: QEMU's stream through the broker, with bounded memory.

The source QEMU writes to one end of a socketpair (handed over with
SCM_RIGHTS); a sender thread reads whole chunks from the other end and
pushes several at once onto a Redis list (one RPUSH, sent from the chunk
buffer without a copy).  A receiver thread on the dest pops up to a
window's worth at once (BLMPOP), acknowledges the batch, and writes it into
the incoming QEMU's socketpair.  The sender never has more than `window`
bytes unacknowledged, so Redis holds at most a few MiB per migration
whatever the guest size (backpressure both ways: a slow dest stops the
sender, a full socket stops QEMU).  scripts/bench/tunnel_micro.py measures
the tunnel alone.

Keys (all deleted at the end):  ferry:tunnel:<job>:data  chunks, b"" = end
                                ferry:tunnel:<job>:ack   one length per popped batch
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
ACK_DRAIN = 1024  # acknowledgements the sender takes with each push, at most
POP_COUNT = 256  # chunks the receiver pops at once, at most (the window bounds it)
SOCKET_BUFFER = 4 << 20  # bytes the kernel may buffer in each QEMU socket
READ_SIZE = 1 << 20  # bytes per read from Redis (redis-py reads 64 KiB by default)


def stream_pair() -> tuple[socket.socket, socket.socket]:
    """A socketpair for QEMU's stream whose buffers hold a whole push or pop.

    With the default ~200 KiB QEMU and the pump take turns: QEMU blocks
    while the pump talks to Redis.  Bigger buffers let both run at once
    (capped by net.core.wmem_max/rmem_max; kernel memory, not Redis's).
    """
    pair = socket.socketpair()
    for sock in pair:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    return pair


def _keys(job_id: str) -> tuple[str, str, str]:
    base = f"ferry:tunnel:{job_id}"
    return f"{base}:data", f"{base}:ack", f"{base}:closed"


class _Pump(threading.Thread):
    def __init__(self, name: str, settings: Settings, job_id: str,
                 sock: socket.socket) -> None:
        super().__init__(name=name, daemon=True)
        self.redis = broker.connect(settings, socket_timeout=10, socket_read_size=READ_SIZE)
        self.settings = settings
        self.lost_note = broker.lost_connection_note(settings)
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
                if isinstance(exc, redis.ConnectionError):
                    self.error += self.lost_note
                log.warning("tunnel %s: %s", self.job_id, self.error)
                self.close()
                if isinstance(exc, redis.ConnectionError):
                    self.keep_error()

    def keep_error(self) -> None:
        """Tell the other side, and the later phases, why the stream broke, once the
        broker answers again (after a failover: the new master), within the worker's
        retry bound; this thread is ending anyway."""
        assert self.error is not None
        with contextlib.suppress(redis.RedisError), \
                broker.connect(self.settings, retry=True, socket_timeout=5) as client:
            client.set(self.closed_key, "1", ex=300)  # each command retried on its own
            client.set(error_key(self.job_id), self.error, ex=300)


def _pack(*args: bytes | memoryview) -> list[bytes | memoryview]:
    """One RESP command as parts to send in turn: big values are sent as they are.

    redis-py's packer (hiredis's too) builds one buffer per command, a copy
    of every MiB on the tunnel's hot path; these parts are written with
    sendall each, straight from the chunk buffer.
    """
    parts: list[bytes | memoryview] = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n" % len(arg))
        parts.append(arg)
        parts.append(b"\r\n")
    return parts


class _Conn:
    """One connection of the pool, used for pipelined commands by hand."""

    def __init__(self, client: redis.Redis) -> None:
        self.pool = client.connection_pool
        self.conn = self.pool.get_connection()
        self.pending = 0  # replies not read yet

    def send(self, *commands: list[bytes | memoryview]) -> None:
        packed = [p for c in commands for p in c]
        # redis-py leaves Connection.send_packed_command unannotated
        self.conn.send_packed_command(packed, check_health=False)  # type: ignore[no-untyped-call]
        self.pending += len(commands)

    def read(self) -> object:
        reply = self.conn.read_response()
        self.pending -= 1
        if isinstance(reply, redis.ResponseError):
            raise reply
        return reply

    def __enter__(self) -> _Conn:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        """Back to the pool; with a reply unread (cut short), disconnected first."""
        if exc is not None or self.pending:
            self.conn.disconnect()  # type: ignore[no-untyped-call]  # unannotated in redis-py
        self.pool.release(self.conn)


class TunnelSender(_Pump):
    """QEMU's stream to the data list, several chunks per command, within the window.

    The receiver acknowledges what it popped (one count per batch); the
    sender reads those counts with each push (the same round trip) and
    blocks on them only when the window is full.
    """

    def __init__(self, settings: Settings, job_id: str, sock: socket.socket, *, window: int,
                 chunk: int) -> None:
        super().__init__("tunnel-send", settings, job_id, sock)
        self.window, self.chunk = window, min(chunk, window)
        self.inflight = 0
        self.batch = max(1, window // (2 * self.chunk))  # chunks per push: two pushes in flight

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
        with _Conn(self.redis) as conn:
            self._pump(conn)

    def _pump(self, conn: _Conn) -> None:
        buf = bytearray(self.chunk * self.batch)
        view = memoryview(buf)
        data_key, ack_key = self.data_key.encode(), self.ack_key.encode()
        while not self.stop_event.is_set():
            self.wait_credit(conn, self.chunk)
            room = min(self.batch, (self.window - self.inflight) // self.chunk) or 1
            chunks, ended = self.read_chunks(view, room)
            if ended:
                chunks.append(view[:0])  # b"": the end of the stream
            if chunks:
                conn.send(_pack(b"RPUSH", data_key, *chunks),
                          _pack(b"LPOP", ack_key, b"%d" % ACK_DRAIN))
                conn.read()
                self.credit(conn.read())
            if ended:
                return

    def read_chunks(self, view: memoryview, room: int) -> tuple[list[memoryview], bool]:
        """Up to `room` full chunks of `view`; True once the stream has ended."""
        chunks: list[memoryview] = []
        for i in range(room):
            part = view[i * self.chunk:(i + 1) * self.chunk]
            n = self.read_full(part)
            if n:
                chunks.append(part[:n])
                self.inflight += n
                self.bytes += n
            if n < self.chunk:
                return chunks, True
        return chunks, False

    def credit(self, acks: object) -> None:
        if isinstance(acks, list):
            self.inflight -= sum(int(a) for a in acks)

    def wait_credit(self, conn: _Conn, n: int) -> None:
        last = time.monotonic()
        ack_key = self.ack_key.encode()
        while self.inflight + n > self.window:
            conn.send(_pack(b"BLPOP", ack_key, b"%g" % POLL_S))
            item = conn.read()
            if isinstance(item, list):
                self.inflight -= int(item[1])
                last = time.monotonic()
            elif self.closed():
                raise OSError("tunnel closed by the other side")
            elif time.monotonic() - last > IDLE_LIMIT_S:
                raise TimeoutError(f"no acknowledgement for {IDLE_LIMIT_S:.0f}s")


class TunnelReceiver(_Pump):
    """The data list to the incoming QEMU: pops whole batches, acknowledges each batch
    before writing it out, so the sender refills Redis while QEMU reads."""

    def __init__(self, settings: Settings, job_id: str, sock: socket.socket) -> None:
        super().__init__("tunnel-recv", settings, job_id, sock)
        self.done = threading.Event()

    def cleanup(self) -> None:
        self.redis.delete(self.data_key, self.ack_key, self.closed_key)

    def pump(self) -> None:
        with _Conn(self.redis) as conn:
            self._pump(conn)

    def _pump(self, conn: _Conn) -> None:
        """The next pop is sent before this batch goes to QEMU, so Redis hands over the
        next batch while QEMU reads this one."""
        data_key, ack_key = self.data_key.encode(), self.ack_key.encode()
        pop = _pack(b"BLMPOP", b"%g" % POLL_S, b"1", data_key, b"LEFT", b"COUNT",
                    b"%d" % POP_COUNT)
        conn.send(pop)
        while True:
            reply = conn.read()
            if not isinstance(reply, list):
                if self.closed():
                    raise OSError("tunnel closed by the other side")
                if self.stop_event.is_set():
                    return
                conn.send(pop)
                continue
            items = reply[1]
            size = sum(len(i) for i in items)
            end = not items[-1]  # b"": the end of the stream
            commands = [_pack(b"RPUSH", ack_key, b"%d" % size)] if size else []
            if not end and not self.stop_event.is_set():
                commands.append(pop)
            if commands:
                conn.send(*commands)
            for data in items:
                self.sock.sendall(data)
                self.bytes += len(data)
            if size:
                conn.read()
            if end:
                self.done.set()
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
                return
            if self.stop_event.is_set():
                return


def _name_native_thread(name: bytes) -> None:
    """Name the OS thread (/proc/PID/task/TID/comm) so leftovers can be seen from outside."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.prctl(15, name, 0, 0, 0)  # PR_SET_NAME


def error_key(job_id: str) -> str:
    return f"ferry:tunnel:{job_id}:error"


def broken(client: redis.Redis, job_id: str) -> str | None:
    """Why a tunnel of this job broke on the broker's side (kept for 5 minutes)."""
    raw = client.get(error_key(job_id))
    if raw is None:
        return None
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def mark_closed(client: redis.Redis, job_id: str) -> None:
    """Flag the tunnel closed for the other side: its end here died with this host's
    worker, so a sender waiting for acknowledgements stops now, not after its join."""
    client.set(_keys(job_id)[2], "1", ex=300)


def reset(client: redis.Redis, job_id: str) -> None:
    """Forget any leftovers of an earlier attempt of this job."""
    client.delete(*_keys(job_id), error_key(job_id))
