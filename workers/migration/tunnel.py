"""Tunnelled migration: QEMU's stream through the broker, with bounded memory.

A tunnel has one channel per connection QEMU makes: the main stream, and with
--parallel one more per multifd channel.  Each channel is a stream of its own
through Redis, with its own window, moved by a pair of pump threads::

    source QEMU -> TunnelSender -RPUSH-> :data -BLMPOP-> TunnelReceiver -> dest QEMU
                        ^----LPOP/BLPOP-- :ack <-RPUSH--------'

The sender forwards what QEMU has written as soon as it has it (a full chunk
is never waited for: QEMU may be waiting for the other end), several chunks
per RPUSH, and reads the acknowledgements of earlier pushes in the same round
trips; it blocks on them only when `window` bytes are unacknowledged, so
Redis holds at most a window per channel whatever the guest size
(backpressure both ways: a slow dest stops the sender, a full socket stops
QEMU).  The receiver pops up to a window at once, acknowledges it and asks
for the next batch before it writes this one to QEMU.  Both speak RESP on the
raw socket (tunnel_wire.py): the sender with one copy per byte, the receiver
with none where it can splice (tunnel_splice.py).

Channel 0 also carries QEMU's return path back, dest to source (the dest's
"loaded" reply before the source counts the migration done; post-copy's page
requests): BackSender reads what the dest QEMU writes and pushes it to
:back, BackReceiver pops it into the source QEMU's socket.  These are a few
bytes per migration (16 measured), so the back stream has no window.
workers/migration/tunnel_ends.py puts the pumps of each side together;
scripts/bench/tunnel_micro.py measures them without QEMU.

Keys (workers/jobs.py names them):
    ferry:tunnel:<job>:data, :ack       channel 0 (b"" in :data = the end)
    ferry:tunnel:<job>:<i>:data, :ack   channel i >= 1
    ferry:tunnel:<job>:channels         how many a parallel tunnel has
    ferry:tunnel:<job>:back             the return path, dest to source
    ferry:tunnel:<job>:closed           set by either side (or for a receiver that died)
    ferry:tunnel:<job>:error            why it broke, for the later phases
The receivers delete their channels when they have done; the job's end deletes
them all in any case, so a failed or aborted job leaves none.  After the end
nothing re-creates them: the closed flag is set only while the job has not
ended, a pump stops once it has, and a pump that ends after the job deletes
what its last writes made.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import socket
import threading
import time
from collections.abc import Callable

import redis

from config import broker
from config.settings import Settings
from workers.jobs import (
    ended_key,
    tunnel_back_key,
    tunnel_channel_keys,
    tunnel_channels_key,
    tunnel_error_key,
    tunnel_keys,
)
from workers.migration.tunnel_splice import Pipe
from workers.migration.tunnel_wire import Part, RawConn, SpliceConn, pack

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often blocked pops look at the stop flags
IDLE_LIMIT_S = 60.0  # no progress at all for this long ends the tunnel
ACK_DRAIN = 1024  # acknowledgements the sender takes with each push, at most
POP_COUNT = 256  # chunks the receiver pops at once, at most (the window bounds it)
SOCKET_BUFFER = 4 << 20  # bytes the kernel may buffer in each QEMU socket we make
IN_FLIGHT = 4  # pushes the sender sends before it reads their replies
BACK_READ = 64 << 10  # the most the back stream moves at once
THREAD_NAME = b"ferry-tunnel"  # the data pumps' OS thread name (tests count them)
BACK_THREAD_NAME = b"ferry-tun-back"


def stream_pair() -> tuple[socket.socket, socket.socket]:
    """A socketpair for QEMU's stream whose buffers hold a whole push or pop.

    With the default ~200 KiB QEMU and the pump take turns: QEMU blocks
    while the pump talks to Redis.  Bigger buffers let both run at once
    (capped by net.core.wmem_max/rmem_max; kernel memory, not Redis's).
    """
    pair = socket.socketpair()
    for sock in pair:
        widen(sock)
    return pair


def widen(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


def channel_keys(job_id: str, channel: int) -> tuple[str, str]:
    """(data, ack) of a channel; channel 0 keeps the single stream's names."""
    return tunnel_channel_keys(job_id, channel)


def closed_key(job_id: str) -> str:
    return tunnel_keys(job_id)[2]


def back_key(job_id: str) -> str:
    return tunnel_back_key(job_id)


def error_key(job_id: str) -> str:
    return tunnel_error_key(job_id)


# Flag the stream closed, unless the job has ended (its end deleted the stream).
_SET_CLOSED = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
return 1
"""
# A pump's last act: if the job ended while it ran, what it wrote since goes.
_FORGET_IF_ENDED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('DEL', unpack(KEYS, 2))
"""
# A broken stream's closed flag and error, unless the job has ended meanwhile.
_KEEP_ERROR = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[1])
return 1
"""
CLOSED_TTL_S = 300  # a closed flag whose job never ends (every host down) expires


def _set_closed(client: redis.Redis, job_id: str) -> None:
    client.register_script(_SET_CLOSED)(keys=[closed_key(job_id), ended_key(job_id)],
                                        args=[CLOSED_TTL_S])


class _Pump(threading.Thread):
    """One thread moving one direction of one channel, with its own Redis connection."""

    thread_name = THREAD_NAME
    conn_class: type[RawConn] = RawConn

    def __init__(self, name: str, settings: Settings, job_id: str,
                 sock: socket.socket | None, channel: int = 0,
                 on_error: Callable[[], None] | None = None) -> None:
        super().__init__(name=f"{name}-{channel}", daemon=True)
        self.redis = broker.connect(settings, socket_timeout=10)
        self.settings = settings
        self.lost_note = broker.lost_connection_note(settings)
        self.job_id = job_id
        self.channel = channel
        self.sock = sock
        self.data_key, self.ack_key = channel_keys(job_id, channel)
        self.closed_key = closed_key(job_id)
        self.ended_key = ended_key(job_id)
        self.stop_event = threading.Event()
        self.on_error = on_error
        self.error: str | None = None
        self.bytes = 0

    def closed(self) -> bool:
        """Stopped here, flagged closed by the other side, or the job has ended."""
        return self.stop_event.is_set() or \
            bool(self.redis.exists(self.closed_key, self.ended_key))

    def own_keys(self) -> list[str]:
        """What this pump writes (deleted if it ends after the job did)."""
        return [self.data_key, self.ack_key, self.closed_key]

    def close(self) -> None:
        """Close our end first (QEMU's writes or reads then fail at once), then flag it."""
        self.stop_event.set()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(redis.RedisError):
            _set_closed(self.redis, self.job_id)

    def join(self, timeout: float | None = None) -> None:
        if self.ident is not None:  # a tunnel may be discarded before it started
            super().join(timeout)

    def finish(self, timeout: float) -> None:
        self.join(timeout)
        if self.is_alive():
            self.close()
            self.join(5)
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        with contextlib.suppress(redis.RedisError):
            self.cleanup()
        self.redis.close()

    def cleanup(self) -> None:
        """The sender leaves its data for the receiver; the job's end deletes the keys
        (they expire should it never come)."""
        for key in (self.data_key, self.ack_key, self.closed_key):
            self.redis.expire(key, CLOSED_TTL_S)

    def pump(self, conn: RawConn) -> None:
        raise NotImplementedError

    def run(self) -> None:
        _name_native_thread(self.thread_name)
        conn: RawConn | None = None
        try:
            conn = self.conn_class(self.redis)
            self.pump(conn)
        except (OSError, redis.RedisError, TimeoutError) as exc:
            if conn is not None:
                conn.close(broken=True)
                conn = None
            if not self.stop_event.is_set():
                self.fail(exc)
        finally:
            if conn is not None:
                conn.close()
            with contextlib.suppress(redis.RedisError):
                self.redis.register_script(_FORGET_IF_ENDED)(
                    keys=[self.ended_key, *self.own_keys()])

    def fail(self, exc: BaseException) -> None:
        self.error = f"{self.name}: {exc}"
        if isinstance(exc, redis.ConnectionError):
            self.error += self.lost_note
        log.warning("tunnel %s: %s", self.job_id, self.error)
        self.close()
        if isinstance(exc, redis.ConnectionError):
            self.keep_error()
        if self.on_error is not None:
            self.on_error()

    def keep_error(self) -> None:
        """Tell the other side, and the later phases, why the stream broke, once the
        broker answers again (after a failover: the new master), within the worker's
        retry bound; this thread is ending anyway.  A job that ended meanwhile is left
        alone (its end deleted the stream)."""
        assert self.error is not None
        with contextlib.suppress(redis.RedisError), \
                broker.connect(self.settings, retry=True, socket_timeout=5) as client:
            client.register_script(_KEEP_ERROR)(  # retried as one command
                keys=[self.closed_key, error_key(self.job_id), self.ended_key],
                args=[CLOSED_TTL_S, self.error])


class TunnelSender(_Pump):
    """QEMU's stream of one channel to its data list, within the window.

    It reads and writes the bytes itself (recv_into, one sendmsg per push): splicing them
    into the broker's socket saved the sender 0.1 CPU s per GiB and cost Redis as much
    again, reading them (scripts/bench/STREAMS.md)."""

    def __init__(self, settings: Settings, job_id: str, sock: socket.socket, *, window: int,
                 chunk: int, channel: int = 0,
                 on_error: Callable[[], None] | None = None) -> None:
        super().__init__("tunnel-send", settings, job_id, sock, channel, on_error)
        self.window, self.chunk = window, min(chunk, window)
        self.inflight = 0
        # bytes per push: half the window, so two pushes are in flight
        self.batch = max(1, window // (2 * self.chunk)) * self.chunk
        self.ended = threading.Event()  # QEMU closed its end and the end mark went out

    def pump(self, conn: RawConn) -> None:
        buf = bytearray(self.batch)
        view = memoryview(buf)
        data_key = self.data_key.encode()
        while not self.stop_event.is_set():
            self.wait_credit(conn)
            room = min(self.batch, self.window - self.inflight)
            n, ended = self.read_some(view[:room])
            if self.stop_event.is_set():
                return  # closed: the other side is told by the closed flag, not an end mark
            parts: list[Part] = [view[k:min(k + self.chunk, n)] for k in range(0, n, self.chunk)]
            if ended:
                parts.append(b"")  # the end of the stream
            self.inflight += n
            self.bytes += n
            if parts:
                conn.send(pack(b"RPUSH", data_key, *parts),
                          pack(b"LPOP", self.ack_key.encode(), b"%d" % ACK_DRAIN))
            self.collect(conn, IN_FLIGHT * 2)
            if ended:
                self.collect(conn, 0)
                self.ended.set()
                return

    def read_some(self, view: memoryview) -> tuple[int, bool]:
        """What QEMU has written, up to len(view): waits for the first byte only (QEMU
        may be waiting for the other end); True once the stream has ended."""
        assert self.sock is not None
        n = self.sock.recv_into(view)
        if n == 0:
            return 0, True
        while n < len(view):
            try:
                got = self.sock.recv_into(view[n:], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if got == 0:
                return n, True
            n += got
        return n, False

    def collect(self, conn: RawConn, keep: int) -> None:
        """Read the replies of all but the last `keep` commands (pushes, ack pops)."""
        while conn.pending > keep:
            reply = conn.read()
            if isinstance(reply, list):  # LPOP's acknowledgements
                self.inflight -= sum(int(a) for a in reply if isinstance(a, bytes | int))

    def wait_credit(self, conn: RawConn) -> None:
        """Until at least a chunk fits in the window (the acks of earlier pushes)."""
        last = time.monotonic()
        while self.inflight + self.chunk > self.window:
            if conn.pending:
                self.collect(conn, 0)
                continue
            conn.send(pack(b"BLPOP", self.ack_key.encode(), b"%g" % POLL_S))
            item = conn.read()
            if isinstance(item, list) and len(item) == 2 and isinstance(item[1], bytes):
                self.inflight -= int(item[1])
                last = time.monotonic()
            elif self.closed():
                raise OSError("tunnel closed by the other side")
            elif time.monotonic() - last > IDLE_LIMIT_S:
                raise TimeoutError(f"no acknowledgement for {IDLE_LIMIT_S:.0f}s")


class TunnelReceiver(_Pump):
    """One channel's data list to the incoming QEMU: pops whole batches, acknowledges
    each before writing it out, so the sender refills Redis while QEMU reads.

    `connect` gives the socket when the channel is made on the first data
    (parallel channels: QEMU takes them in the order the source accepted them).
    """

    conn_class = SpliceConn

    def __init__(self, settings: Settings, job_id: str, sock: socket.socket | None,
                 channel: int = 0, connect: Callable[[int], socket.socket] | None = None,
                 on_error: Callable[[], None] | None = None, window: int = 4 << 20) -> None:
        super().__init__("tunnel-recv", settings, job_id, sock, channel, on_error)
        self.connect = connect
        self.window = window
        self.done = threading.Event()

    def cleanup(self) -> None:
        self.redis.delete(self.data_key, self.ack_key)
        self.redis.expire(self.closed_key, CLOSED_TTL_S)

    def pump(self, conn: RawConn) -> None:
        """The next pop is sent before this batch goes to QEMU, so Redis hands over the
        next batch while QEMU reads this one."""
        if isinstance(conn, SpliceConn) and conn.use_splice():
            self.pump_spliced(conn)
            return
        buf = bytearray(self.window)
        ack_key = self.ack_key.encode()
        pop = pack(b"BLMPOP", b"%g" % POLL_S, b"1", self.data_key.encode(), b"LEFT",
                   b"COUNT", b"%d" % POP_COUNT)
        conn.send(pop)
        while True:
            items = conn.read_pop(buf)
            if items is None:
                if self.closed():
                    raise OSError("tunnel closed by the other side")
                if self.stop_event.is_set():
                    return
                conn.send(pop)
                continue
            size = sum(len(i) for i in items)
            end = not items or not items[-1]  # b"": the end of the stream
            commands = [pack(b"RPUSH", ack_key, b"%d" % size)] if size else []
            if not end and not self.stop_event.is_set():
                commands.append(pop)
            if commands:
                conn.send(*commands)
            self.write(items)
            if size:
                conn.read()
            if end:
                self.done.set()
                assert self.sock is not None
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
                return
            if self.stop_event.is_set():
                return

    def pump_spliced(self, conn: SpliceConn) -> None:
        """As pump, each element spliced from the broker's socket into QEMU's.  Each is
        acknowledged when its header arrives (Redis no longer holds it), and the last one's
        acknowledgement carries the next pop, so Redis hands over the next batch while
        QEMU reads this one."""
        pipe = Pipe()
        ack_key = self.ack_key.encode()
        pop = pack(b"BLMPOP", b"%g" % POLL_S, b"1", self.data_key.encode(), b"LEFT",
                   b"COUNT", b"%d" % POP_COUNT)
        try:
            conn.send(pop)
            while True:
                count = conn.pop_header()
                if count is None:
                    if self.closed():
                        raise OSError("tunnel closed by the other side")
                    if self.stop_event.is_set():
                        return
                    conn.send(pop)
                    continue
                if self.move_batch(conn, pipe, count, ack_key, pop):
                    return
        finally:
            pipe.close()

    def move_batch(self, conn: SpliceConn, pipe: Pipe, count: int, ack_key: bytes,
                   pop: list[Part]) -> bool:
        """One popped batch into QEMU; True at the end of the stream."""
        acks = 0
        for i in range(count):
            size = conn.bulk_size()
            if size == 0:  # b"": the end of the stream, always the last one
                conn.end_bulk()
                break
            last = i == count - 1
            ack = pack(b"RPUSH", ack_key, b"%d" % size)
            go_on = last and not self.stop_event.is_set()
            conn.send(ack, pop) if go_on else conn.send(ack)
            acks += 1
            conn.move_bulk(size, self.socket(), pipe)
            self.bytes += size
        else:
            for _ in range(acks):
                conn.read()
            return self.stop_event.is_set()
        for _ in range(acks):
            conn.read()
        self.done.set()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        return True

    def socket(self) -> socket.socket:
        """QEMU's end of this channel, made on the first data (parallel channels)."""
        if self.sock is None:
            assert self.connect is not None
            self.sock = self.connect(self.channel)
        return self.sock

    def write(self, items: list[memoryview]) -> None:
        if self.sock is None and any(items):
            assert self.connect is not None
            self.sock = self.connect(self.channel)
        for data in items:
            if data:
                assert self.sock is not None
                self.sock.sendall(data)
                self.bytes += len(data)


class BackSender(_Pump):
    """The dest QEMU's return path (what it writes on channel 0) to the back list."""

    thread_name = BACK_THREAD_NAME

    def __init__(self, settings: Settings, job_id: str, sock: Callable[[], socket.socket | None],
                 on_error: Callable[[], None] | None = None) -> None:
        super().__init__("tunnel-back-send", settings, job_id, None, 0, on_error)
        self.get_sock = sock

    def own_keys(self) -> list[str]:
        return [back_key(self.job_id)]

    def pump(self, conn: RawConn) -> None:
        while self.sock is None:  # channel 0 is made on the first data
            if self.stop_event.wait(0.01):
                return
            self.sock = self.get_sock()
        key = back_key(self.job_id).encode()
        buf = bytearray(BACK_READ)
        view = memoryview(buf)
        while True:
            try:
                n = self.sock.recv_into(view)
            except OSError:
                n = 0  # our end was shut: the migration is over here
            conn.send(pack(b"RPUSH", key, view[:n]), pack(b"EXPIRE", key, b"300"))
            conn.read()
            conn.read()
            self.bytes += n
            if n == 0:
                return

    def close(self) -> None:
        """The socket belongs to channel 0's receiver: only its reading end is ours."""
        self.stop_event.set()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RD)

    def finish(self, timeout: float) -> None:
        self.close()
        self.join(timeout)
        with contextlib.suppress(redis.RedisError):  # the source read it before Finish
            self.redis.delete(back_key(self.job_id))
        self.redis.close()


class BackReceiver(_Pump):
    """The back list into the source QEMU's channel 0: its return path."""

    thread_name = BACK_THREAD_NAME

    def __init__(self, settings: Settings, job_id: str, sock: socket.socket,
                 on_error: Callable[[], None] | None = None) -> None:
        super().__init__("tunnel-back-recv", settings, job_id, sock, 0, on_error)

    def own_keys(self) -> list[str]:
        return [back_key(self.job_id)]

    def pump(self, conn: RawConn) -> None:
        key = back_key(self.job_id).encode()
        assert self.sock is not None
        while not self.stop_event.is_set():
            conn.send(pack(b"BLPOP", key, b"%g" % POLL_S))
            item = conn.read()
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], bytes):
                if self.closed():
                    return
                continue
            if not item[1]:  # the dest's end closed (or our own wake-up at the end)
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
                return
            self.sock.sendall(item[1])
            self.bytes += len(item[1])

    def wake(self) -> None:
        """Ends the wait for back bytes now: the source's stream is over."""
        self.stop_event.set()
        with contextlib.suppress(redis.RedisError):
            self.redis.rpush(back_key(self.job_id), b"")

    def close(self) -> None:
        """The socket belongs to channel 0's sender: only its writing end is ours."""
        self.wake()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def finish(self, timeout: float) -> None:
        self.wake()
        self.join(timeout)
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(back_key(self.job_id))
        self.redis.close()


def _name_native_thread(name: bytes) -> None:
    """Name the OS thread (/proc/PID/task/TID/comm) so leftovers can be seen from outside."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.prctl(15, name, 0, 0, 0)  # PR_SET_NAME


def broken(client: redis.Redis, job_id: str) -> str | None:
    """Why a tunnel of this job broke on the broker's side (kept for 5 minutes)."""
    raw = client.get(error_key(job_id))
    if raw is None:
        return None
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def mark_closed(client: redis.Redis, job_id: str) -> None:
    """Flag the tunnel closed for the other side: its end here died with this host's
    worker, so a sender waiting for acknowledgements stops now, not after its join
    (a job that has ended meanwhile is left alone: its end deleted the stream)."""
    _set_closed(client, job_id)


def reset(client: redis.Redis, job_id: str, channels: int = 1) -> None:
    """Forget any leftovers of an earlier attempt of this job; a parallel tunnel says how
    many channels it has, so the job's end deletes them all (workers/jobs.py)."""
    keys = [k for i in range(channels) for k in channel_keys(job_id, i)]
    client.delete(*keys, closed_key(job_id), back_key(job_id), error_key(job_id))
    if channels > 1:
        client.set(tunnel_channels_key(job_id), channels)
