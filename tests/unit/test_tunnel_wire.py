"""The tunnel's wire: RESP written and read on a raw socket, and the zero-copy moves, against
a socketpair standing in for the broker (no Redis: the bytes are the protocol)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from workers.migration import tunnel_wire
from workers.migration.tunnel_ends import socket_path
from workers.migration.tunnel_splice import Pipe
from workers.migration.tunnel_wire import RawConn, SpliceConn, pack, send_all


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.disconnected = False

    def disconnect(self) -> None:
        self.disconnected = True


class _Pool:
    def __init__(self, sock: socket.socket) -> None:
        self.conn = _Conn(sock)
        self.released: list[_Conn] = []

    def get_connection(self) -> _Conn:
        return self.conn

    def release(self, conn: _Conn) -> None:
        self.released.append(conn)


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.connection_pool = _Pool(sock)


def _pair(kind: type[RawConn] = RawConn) -> tuple[Any, socket.socket]:
    ours, broker = socket.socketpair()
    return kind(_Client(ours)), broker  # type: ignore[arg-type]


def test_a_command_is_its_parts_with_big_values_sent_as_they_are() -> None:
    value = memoryview(bytearray(b"x" * 10000))
    parts = pack(b"RPUSH", b"k", value)
    assert parts[0] == b"*3\r\n" and parts[8] is value
    assert b"".join(bytes(p) for p in parts) == b"*3\r\n$5\r\nRPUSH\r\n$1\r\nk\r\n$10000\r\n" + \
        b"x" * 10000 + b"\r\n"


def test_send_all_goes_on_after_short_sends_until_every_byte_is_out() -> None:
    class Short:
        def __init__(self) -> None:
            self.out = bytearray()

        def sendmsg(self, views: list[memoryview]) -> int:
            take = min(7, sum(len(v) for v in views))
            data = b"".join(bytes(v) for v in views)[:take]
            self.out += data
            return take

    sink = Short()
    send_all(sink, [b"abc", b"d" * 5000, b"ef"])  # type: ignore[arg-type]
    assert bytes(sink.out) == b"abc" + b"d" * 5000 + b"ef"


@pytest.mark.parametrize("wire, reply", [
    (b"+OK\r\n", b"OK"), (b":42\r\n", 42), (b"_\r\n", None), (b"*-1\r\n", None),
    (b"$-1\r\n", None), (b"$3\r\nabc\r\n", b"abc"),
    (b"*2\r\n$1\r\nk\r\n$2\r\n12\r\n", [b"k", b"12"]),
])
def test_replies_of_resp2_and_resp3_are_read(wire: bytes, reply: object) -> None:
    conn, broker = _pair()
    conn.pending = 1
    broker.sendall(wire)
    assert conn.read() == reply and conn.pending == 0


def test_an_error_reply_is_a_response_error() -> None:
    conn, broker = _pair()
    broker.sendall(b"-WRONGTYPE nope\r\n")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        conn.read()


def test_a_popped_batch_lands_in_the_buffer_and_a_too_big_element_gets_its_own() -> None:
    conn, broker = _pair()
    broker.sendall(b"*2\r\n$4\r\nkeyk\r\n*3\r\n$3\r\nabc\r\n$5\r\ndefgh\r\n$0\r\n\r\n")
    buf = bytearray(6)
    views = conn.read_pop(buf)
    assert views is not None
    assert [bytes(v) for v in views] == [b"abc", b"defgh", b""]
    assert views[0].obj is buf and views[1].obj is not buf  # 3 + 5 > 6
    broker.sendall(b"_\r\n")
    assert conn.read_pop(buf) is None


def test_a_broker_that_closes_is_a_connection_error() -> None:
    conn, broker = _pair()
    broker.close()
    with pytest.raises(redis.ConnectionError):
        conn.read()


def test_a_connection_cut_short_is_disconnected_before_it_goes_back_to_the_pool() -> None:
    conn, _broker = _pair()
    conn.pending = 1
    conn.close()
    assert conn.conn.disconnected and conn.pool.released == [conn.conn]


def test_spliced_elements_go_socket_to_socket_with_their_framing() -> None:
    conn, broker = _pair(SpliceConn)
    assert conn.use_splice()
    qemu, qemu_peer = socket.socketpair()
    data = bytes(range(256)) * 4096  # 1 MiB
    pipe = Pipe()
    try:
        t = threading.Thread(target=broker.sendall, args=(
            b"*2\r\n$1\r\nk\r\n*2\r\n$%d\r\n" % len(data) + data + b"\r\n$0\r\n\r\n",))
        t.start()
        got = bytearray()
        reader = threading.Thread(target=lambda: got.extend(_read(qemu_peer, len(data))))
        reader.start()
        conn.pending = 1
        assert conn.pop_header() == 2
        size = conn.bulk_size()
        conn.move_bulk(size, qemu, pipe)
        assert conn.bulk_size() == 0
        conn.end_bulk()
        t.join()
        reader.join()
        assert bytes(got) == data
    finally:
        pipe.close()


def test_tunnel_sockets_have_short_names_whatever_the_job_id(tmp_path: Path) -> None:
    path = socket_path(tmp_path, "tun", "a/../" + "x" * 300)
    assert path.parent == tmp_path and len(path.name) == len("tun-") + 16 + len(".sock")
    assert socket_path(tmp_path, "tun", "j") != socket_path(tmp_path, "in", "j")


def _read(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def test_the_head_buffer_keeps_an_unread_tail_when_it_fills() -> None:
    conn, broker = _pair()
    conn.head = bytearray(16)
    conn.start, conn.end = 0, 0
    conn.pending = 2
    broker.sendall(b":1\r\n:22222222\r\n")
    assert conn.read() == 1
    assert conn.read() == 22222222
    assert tunnel_wire.HEAD_SIZE >= 4096
