"""Port ranges: a port is handed out when QEMU could listen on it, and only then."""

from __future__ import annotations

import socket

import pytest

from workers.errors import QemuError
from workers.ports import PortAllocator, bindable


def _listener() -> socket.socket:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as QEMU listens
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    return srv


def test_a_port_someone_listens_on_is_not_bindable() -> None:
    with _listener() as srv:
        assert not bindable("127.0.0.1", srv.getsockname()[1])


def test_a_port_whose_last_connection_lingers_in_time_wait_is_bindable() -> None:
    srv = _listener()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    srv.close()
    conn.close()  # the listening side closes first: its end waits in TIME_WAIT
    cli.recv(1)
    cli.close()
    assert bindable("127.0.0.1", port)


def test_the_allocator_skips_taken_ports_and_says_its_range_when_none_is_left() -> None:
    with _listener() as srv:
        port = srv.getsockname()[1]
        ports = PortAllocator("migration", port, port)
        with pytest.raises(QemuError, match=rf"no free migration port in {port}-{port}"):
            ports.acquire("127.0.0.1")
    assert ports.acquire("127.0.0.1") == port
    with pytest.raises(QemuError):
        ports.acquire("127.0.0.1")  # handed out, not yet released
    ports.release(port)
    assert ports.acquire("127.0.0.1") == port
