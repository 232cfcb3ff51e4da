"""The tunnel's own Redis wire: RESP commands written and replies read on a raw socket.

The tunnel moves every byte of a guest's memory through Redis, so its hot path
avoids the generic client: redis-py (and hiredis under it) build one buffer per
command, a copy of every chunk on the way out, and on the way in read into
their own buffer, copy into the reader, and copy again into a bytes object
per element.  Here a command goes out in one `sendmsg` of its parts (headers
and the chunks themselves, no copy in user space), and a popped batch is read
with `recv_into` straight into the receiver's buffer: one copy in each
direction, the kernel's.  The connection itself (address, AUTH, TLS, Sentinel,
HELLO) is still made by redis-py's pool.

Replies understood: RESP2 and RESP3 simple strings, errors, integers, bulk
strings, arrays and nulls (redis-py 8 speaks RESP3 by default).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from typing import cast

import redis

from workers.migration import tunnel_splice
from workers.migration.tunnel_splice import Pipe

Part = bytes | bytearray | memoryview
Reply = int | bytes | list["Reply"] | None

HEAD_SIZE = 64 << 10  # the buffer for reply headers and small replies
SMALL_READ = 512  # reads of a splicing connection: headers only, the data stays in the kernel
_NULLS = (b"_", b"*-1", b"$-1")


def pack(*args: Part) -> list[Part]:
    """One RESP command as parts to send in turn: big values are sent as they are."""
    parts: list[Part] = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n" % len(arg))
        parts.append(arg)
        parts.append(b"\r\n")
    return parts


def _coalesce(parts: Sequence[Part], small: int = 4096) -> list[Part]:
    """Neighbouring small parts joined (headers, CRLFs), big ones left as they are."""
    out: list[Part] = []
    run: list[Part] = []
    for part in parts:
        if len(part) <= small:
            run.append(part)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(part)
    if run:
        out.append(b"".join(run))
    return out


def send_all(sock: socket.socket, parts: Sequence[Part]) -> None:
    """Every part, in order; one sendmsg per round where the socket allows it."""
    views = [memoryview(p).cast("B") for p in _coalesce(parts)]
    if isinstance(sock, ssl.SSLSocket):  # no sendmsg on TLS sockets
        for view in views:
            sock.sendall(view)
        return
    while views:
        sent = sock.sendmsg(views[:512])  # IOV_MAX is 1024
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


class RawConn:
    """One connection of the broker's pool, driven by hand: pipelined commands, replies
    read in order.  Socket errors become redis.ConnectionError (the broker went away)."""

    def __init__(self, client: redis.Redis) -> None:
        self.pool = client.connection_pool
        self.conn = self.pool.get_connection()
        self.sock = cast(socket.socket, self.conn._sock)  # connected by the pool
        self.head = bytearray(HEAD_SIZE)
        self.start = self.end = 0  # unread bytes of self.head
        self.pending = 0  # replies not read yet
        self.read_size = HEAD_SIZE

    def use_splice(self) -> bool:
        """Move data with splice from now on, if the broker's socket allows it (a plain one:
        QEMU's always is; tunnel_splice.py)."""
        if not tunnel_splice.available(self.sock):
            return False
        tunnel_splice.make_blocking(self.sock)
        self.read_size = SMALL_READ
        return True

    def send(self, *commands: list[Part]) -> None:
        try:
            send_all(self.sock, [p for c in commands for p in c])
        except OSError as exc:
            raise redis.ConnectionError(f"writing to the broker: {exc}") from exc
        self.pending += len(commands)

    def close(self, broken: bool = False) -> None:
        """Back to the pool; with a reply unread (cut short), disconnected first."""
        if broken or self.pending or self.start != self.end:
            self.conn.disconnect()  # type: ignore[no-untyped-call]  # unannotated in redis-py
        self.pool.release(self.conn)

    # -- reading --------------------------------------------------------------------------
    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.head):  # keep the unread tail, at the front
            tail = self.head[self.start:self.end]
            self.head[:len(tail)] = tail
            self.start, self.end = 0, len(tail)
            if self.end == len(self.head):
                raise redis.ConnectionError("reply line longer than the read buffer")
        room = memoryview(self.head)[self.end:]
        try:
            n = self.sock.recv_into(room, min(self.read_size, len(room)))
        except OSError as exc:
            raise redis.ConnectionError(f"reading from the broker: {exc}") from exc
        if n == 0:
            raise redis.ConnectionError("the broker closed the connection")
        self.end += n

    def _line(self) -> bytes:
        while True:
            at = self.head.find(b"\r\n", self.start, self.end)
            if at >= 0:
                line = bytes(self.head[self.start:at])
                self.start = at + 2
                return line
            self._fill()

    def _into(self, view: memoryview) -> None:
        """Exactly len(view) bytes into view: what the head buffer holds, then the socket."""
        have = min(len(view), self.end - self.start)
        view[:have] = self.head[self.start:self.start + have]
        self.start += have
        got = have
        while got < len(view):
            try:
                n = self.sock.recv_into(view[got:])
            except OSError as exc:
                raise redis.ConnectionError(f"reading from the broker: {exc}") from exc
            if n == 0:
                raise redis.ConnectionError("the broker closed the connection")
            got += n

    def _crlf(self) -> None:
        while self.end - self.start < 2:
            self._fill()
        self.start += 2

    def _value(self, line: bytes) -> Reply:
        kind, rest = line[:1], line[1:]
        if line in _NULLS:
            return None
        if kind in (b"+", b"(", b"#", b","):
            return rest
        if kind == b":":
            return int(rest)
        if kind == b"-":
            raise redis.ResponseError(rest.decode(errors="replace"))
        if kind in (b"$", b"="):
            data = bytearray(int(rest))
            self._into(memoryview(data))
            self._crlf()
            return bytes(data)
        if kind in (b"*", b">", b"~"):
            return [self._value(self._line()) for _ in range(int(rest))]
        raise redis.ConnectionError(f"unexpected reply from the broker: {line[:40]!r}")

    def read(self) -> Reply:
        """The next reply (a small one: integers, acknowledgement lists)."""
        reply = self._value(self._line())
        self.pending -= 1
        return reply

    def read_pop(self, buf: bytearray) -> list[memoryview] | None:
        """The next reply, a BLMPOP's ([key, [elements]], or a null on timeout), its
        elements read straight into `buf` as views of it (an element that does not fit
        gets a buffer of its own: the sender's window, not this one, bounds a batch)."""
        line = self._line()
        self.pending -= 1
        if line in _NULLS:
            return None
        if line != b"*2":
            self._value(line)  # an error reply raises
            raise _unexpected(line)
        self._value(self._line())  # the key
        count = self._line()
        if count[:1] != b"*":
            raise _unexpected(count)
        views: list[memoryview] = []
        offset = 0
        for _ in range(int(count[1:])):
            head = self._line()
            if head[:1] != b"$":
                raise _unexpected(head)
            size = int(head[1:])
            if offset + size <= len(buf):
                view = memoryview(buf)[offset:offset + size]
                offset += size
            else:
                view = memoryview(bytearray(size))
            self._into(view)
            self._crlf()
            views.append(view)
        return views


def _unexpected(line: bytes) -> redis.ConnectionError:
    return redis.ConnectionError(f"unexpected reply to a pop: {line[:40]!r}")


class SpliceConn(RawConn):
    """A RawConn whose popped elements go from the broker's socket to QEMU's through a
    pipe, never through the worker's memory: headers are read a few hundred bytes at a
    time, the rest is spliced."""

    def pop_header(self) -> int | None:
        """The next reply, a BLMPOP's, read up to its number of elements (None: timeout)."""
        line = self._line()
        self.pending -= 1
        if line in _NULLS:
            return None
        if line != b"*2":
            self._value(line)  # an error reply raises
            raise _unexpected(line)
        self._value(self._line())  # the key
        count = self._line()
        if count[:1] != b"*":
            raise _unexpected(count)
        return int(count[1:])

    def bulk_size(self) -> int:
        head = self._line()
        if head[:1] != b"$":
            raise _unexpected(head)
        return int(head[1:])

    def move_bulk(self, size: int, dst: socket.socket, pipe: Pipe) -> None:
        """The element's `size` bytes into `dst`: the few the header read took along,
        then the rest spliced; then its CRLF."""
        have = min(size, self.end - self.start)
        if have:
            dst.sendall(memoryview(self.head)[self.start:self.start + have])
            self.start += have
        pipe.move(self.sock.fileno(), dst.fileno(), size - have)
        self._crlf()

    def end_bulk(self) -> None:
        """An empty element: only its CRLF."""
        self._crlf()
