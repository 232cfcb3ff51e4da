"""A throwaway redis-server for the unit tests that check bytes on the wire (started
per module, stopped by pid)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
import redis

from scripts.testbed.stack import free_port, stop_pid, wait_for


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The port of a redis-server with password `pw`."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--requirepass", "pw",
                             "--dir", str(tmp_path_factory.mktemp("redis"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password="pw", socket_timeout=5)
    try:
        wait_for(lambda: _pings(client), 10, "redis-server to answer")
        yield port
    finally:
        client.close()
        stop_pid(proc.pid)
        proc.wait()
