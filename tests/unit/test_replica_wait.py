"""Guarded writes: WAIT for a replica with a Sentinel broker only, failed without one."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from config.replication import ReplicaWaitError, guarded_write, wait_ms


class FakePipe:
    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.queued: list[tuple[str, tuple[Any, ...]]] = []

    def set(self, *args: Any) -> None:
        self.queued.append(("set", args))

    def wait(self, *args: Any) -> None:
        self.queued.append(("wait", args))

    def execute(self) -> list[Any]:
        self.client.sent.append(list(self.queued))
        if self.client.fail_first:
            self.client.fail_first -= 1
            raise redis.ConnectionError("master gone")
        return [True if name == "set" else self.client.acks for name, _ in self.queued]


class FakeClient:
    def __init__(self, replica_wait_ms: int = 0, acks: int = 1, retry_s: float = 0,
                 fail_first: int = 0) -> None:
        self.replica_wait_ms, self.acks, self.retry_s = replica_wait_ms, acks, retry_s
        self.fail_first = fail_first
        self.sent: list[list[tuple[str, tuple[Any, ...]]]] = []

    def pipeline(self, transaction: bool = True) -> FakePipe:
        assert transaction is False
        return FakePipe(self)


def _write(client: FakeClient) -> list[Any]:
    # a stand-in for redis.Redis and its Pipeline
    return guarded_write(client, lambda pipe: pipe.set("k", "v"), "the test write")  # type: ignore[arg-type]


def test_a_plain_broker_client_never_waits() -> None:
    client = FakeClient(replica_wait_ms=0)
    assert _write(client) == [True]
    assert client.sent == [[("set", ("k", "v"))]]
    assert wait_ms(redis.Redis()) == 0  # a client ferry did not make: no WAIT either


def test_a_sentinel_client_waits_for_one_replica_on_the_same_connection() -> None:
    client = FakeClient(replica_wait_ms=250)
    assert _write(client) == [True]
    assert client.sent == [[("set", ("k", "v")), ("wait", (1, 250))]]


def test_no_replica_acknowledging_is_a_failed_write_with_the_replies() -> None:
    client = FakeClient(replica_wait_ms=250, acks=0)
    with pytest.raises(ReplicaWaitError) as err:
        _write(client)
    assert err.value.replies == [True]
    assert "the test write: no replica of the broker acknowledged it within 250 ms" in \
        str(err.value)


def test_a_retrying_client_sends_the_whole_batch_again_after_a_lost_connection() -> None:
    client = FakeClient(replica_wait_ms=250, retry_s=5, fail_first=2)
    assert _write(client) == [True]
    assert len(client.sent) == 3
    assert all(batch == [("set", ("k", "v")), ("wait", (1, 250))] for batch in client.sent)


def test_a_plain_client_does_not_retry() -> None:
    with pytest.raises(redis.ConnectionError):
        _write(FakeClient(replica_wait_ms=250, fail_first=1))
