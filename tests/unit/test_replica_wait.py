"""Guarded writes: WAIT for a replica with a Sentinel broker only, failed without one."""

from __future__ import annotations

from typing import Any

import pytest
import redis
import redis.sentinel

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


class FakeConn:
    def __init__(self, address: tuple[str, int]) -> None:
        self.host, self.port = address


class FakeSentinelPool:
    """A Sentinel pool: connections go to `serving` (the server a stale pooled connection
    still reaches first), the sentinels name `master`."""

    def __init__(self, client: SentinelClient, serving: list[tuple[str, int]],
                 master: tuple[str, int] | None) -> None:
        self.client, self.serving, self.master = client, serving, master
        self.asked = 0

    def get_connection(self) -> FakeConn:
        return FakeConn(self.serving.pop(0) if len(self.serving) > 1 else self.serving[0])

    def get_master_address(self) -> tuple[str, int]:
        self.asked += 1
        if self.master is None:
            raise redis.sentinel.MasterNotFoundError("no master")
        return self.master


class SentinelPipe(FakePipe):
    connection: FakeConn | None = None

    def execute(self) -> list[Any]:
        assert self.connection is not None, "the batch runs on the connection it was given"
        client = self.client
        assert isinstance(client, SentinelClient)
        client.where.append((self.connection.host, self.connection.port))
        acks = client.acks_at.get((self.connection.host, self.connection.port), 0)
        client.sent.append(list(self.queued))
        return [True if name == "set" else acks for name, _ in self.queued]


class SentinelClient(FakeClient):
    def __init__(self, serving: list[tuple[str, int]], master: tuple[str, int] | None,
                 acks_at: dict[tuple[str, int], int], retry_s: float = 0) -> None:
        super().__init__(replica_wait_ms=250, retry_s=retry_s)
        self.connection_pool = FakeSentinelPool(self, serving, master)
        self.acks_at = acks_at
        self.where: list[tuple[str, int]] = []

    def pipeline(self, transaction: bool = True) -> FakePipe:
        assert transaction is False
        return SentinelPipe(self)


OLD, NEW = ("127.0.0.1", 7001), ("127.0.0.1", 7002)


def _guarded(client: FakeClient, required: bool = True) -> list[Any]:
    return guarded_write(client, lambda pipe: pipe.set("k", "v"), "the test write",  # type: ignore[arg-type]
                         required=required)


def test_a_batch_a_demoted_master_took_runs_again_on_the_new_master() -> None:
    """The stale pooled connection reaches the old master, which has no replica left
    (they follow the new one): the sentinels name another master, so the batch is sent
    again there, where a replica acknowledges it."""
    client = SentinelClient(serving=[OLD, NEW], master=NEW, acks_at={NEW: 1}, retry_s=5)
    assert _guarded(client) == [True]
    assert client.where == [OLD, NEW]
    assert client.connection_pool.asked == 1  # the pool learnt of the new master


def test_a_master_without_a_replica_is_not_asked_twice() -> None:
    """The sentinels still name the server that took it: no failover, only no replica;
    the write fails as before (no second batch)."""
    client = SentinelClient(serving=[NEW], master=NEW, acks_at={}, retry_s=5)
    with pytest.raises(ReplicaWaitError, match="within 250 ms, so"):
        _guarded(client)
    assert client.where == [NEW]


def test_a_demoted_master_without_retries_is_a_failed_write() -> None:
    client = SentinelClient(serving=[OLD, NEW], master=NEW, acks_at={NEW: 1})
    with pytest.raises(ReplicaWaitError, match="no longer the master") as err:
        _guarded(client)
    assert err.value.replies == [True]
    assert client.where == [OLD]


def test_no_master_known_during_a_failover_is_no_proof_of_one_and_retries() -> None:
    """The sentinels name no master (a failover under way): the server that took it may
    be on its way out, so the batch is sent again (here on the new master)."""
    client = SentinelClient(serving=[OLD, NEW], master=None, acks_at={NEW: 1}, retry_s=5)
    assert _guarded(client) == [True]
    assert client.where == [OLD, NEW]


def test_a_record_that_must_not_fail_stays_on_a_master_without_a_replica() -> None:
    client = SentinelClient(serving=[NEW], master=NEW, acks_at={}, retry_s=5)
    assert _guarded(client, required=False) == [True]
    assert client.where == [NEW]


def test_a_record_that_must_not_fail_follows_a_new_master_too() -> None:
    client = SentinelClient(serving=[OLD, NEW], master=NEW, acks_at={NEW: 1}, retry_s=5)
    assert _guarded(client, required=False) == [True]
    assert client.where == [OLD, NEW]


class _Manager:
    """The sentinels' answers, one per question."""

    def __init__(self, *answers: tuple[str, int]) -> None:
        self.answers = list(answers)
        self.connection_kwargs: dict[str, Any] = {}

    def discover_master(self, service_name: str) -> tuple[str, int]:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


class _BeatClient:
    def __init__(self, pool: redis.sentinel.SentinelConnectionPool) -> None:
        self.connection_pool = pool
        self.written: list[str] = []

    def pipeline(self) -> Any:
        client = self

        class Pipe:
            def set(self, key: str, *_: Any, **__: Any) -> None:
                client.written.append(key)

            def sadd(self, key: str, *_: Any) -> None:
                client.written.append(key)

            def execute(self) -> list[Any]:
                return []
        return Pipe()


def test_each_heartbeat_asks_the_sentinels_so_idle_connections_to_a_demoted_master_go() -> None:
    from workers.heartbeat import Heartbeat

    pool = redis.sentinel.SentinelConnectionPool(
        "ferry", _Manager(("10.0.0.1", 6379), ("10.0.0.2", 6379)))  # type: ignore[arg-type]
    assert pool.get_master_address() == ("10.0.0.1", 6379)
    idle = pool.make_connection()
    pool._available_connections.append(idle)
    dropped: list[bool] = []
    idle.disconnect = lambda *a, **k: dropped.append(True)  # type: ignore[method-assign]
    client = _BeatClient(pool)
    hb = Heartbeat(client, name="h1", uuid="u", address="127.0.0.1",  # type: ignore[arg-type]
                   interval_ms=1000, ttl_ms=3000, guests=list)
    hb.beat()
    assert pool.master_address == ("10.0.0.2", 6379)
    assert dropped == [True], "the idle connection to the old master was not dropped"
    assert client.written == ["ferry:host:h1", "ferry:hosts"]
