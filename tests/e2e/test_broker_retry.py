"""The worker's own Redis client rides out a broker restart, and gives up when it must."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from config import broker
from config.settings import load
from scripts.testbed.stack import Stack, wait_for


@pytest.fixture
def lone_redis() -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="ferry-r-", dir="/tmp"))
    st = Stack(root=root)
    try:
        st.start_redis(persistent=True)
        yield st
    finally:
        st.stop()
        shutil.rmtree(root, ignore_errors=True)


def _client(st: Stack, retry_s: int) -> redis.Redis:
    settings = load({"FERRY_BROKER_URL": st.broker_url, "FERRY_BROKER_RETRY_S": str(retry_s)})
    return broker.connect(settings, retry=True, socket_timeout=2)


def test_a_command_during_a_broker_restart_succeeds_once_redis_is_back(
        lone_redis: Stack, caplog: pytest.LogCaptureFixture) -> None:
    client = _client(lone_redis, 10)
    client.set("ferry:test:kept", "1")
    lone_redis.stop_redis()
    done: list[object] = []
    command = threading.Thread(target=lambda: done.append(
        client.hset("ferry:test:job", "phase", "perform3")))

    with caplog.at_level(logging.WARNING, logger="config.broker"):
        command.start()
        wait_for(lambda: any("Retrying" in r.getMessage() for r in caplog.records), 10,
                 "the command to be retried")
        lone_redis.restart_redis()
        command.join(timeout=15)

    assert done == [1]
    assert client.hget("ferry:test:job", "phase") == b"perform3"
    assert client.get("ferry:test:kept") == b"1", "the append-only file kept the data"


def test_a_command_gives_up_after_the_retry_bound_when_the_broker_stays_away(
        lone_redis: Stack) -> None:
    client = _client(lone_redis, 1)
    client.ping()
    lone_redis.stop_redis()

    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.get("ferry:test:kept")

    assert 0.9 <= time.monotonic() - started < 10


def test_the_plain_client_fails_at_once(lone_redis: Stack) -> None:
    settings = load({"FERRY_BROKER_URL": lone_redis.broker_url})
    client = broker.connect(settings, socket_timeout=2)
    lone_redis.stop_redis()

    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.get("ferry:test:kept")

    assert time.monotonic() - started < 5


def _store_without_message(st: Stack, task_id: str, value: object) -> None:
    """Store a task's result as Celery's Redis backend does, minus the pub/sub message
    (what a waiter whose subscription is being made again after a restart misses)."""
    meta = {"status": "SUCCESS", "result": value, "traceback": None, "children": [],
            "date_done": "2026-11-26T00:00:00", "task_id": task_id}
    st.redis_client().set(f"celery-task-meta-{task_id}", json.dumps(meta))


def test_a_result_whose_message_was_missed_is_still_found_by_the_wait(
        lone_redis: Stack) -> None:
    from celery.exceptions import TimeoutError as CeleryTimeout

    from config.celery_app import client_app
    from tasks import results

    app = client_app(load({"FERRY_BROKER_URL": lone_redis.broker_url}))
    plain, sliced = app.AsyncResult("t-plain"), app.AsyncResult("t-sliced")
    got: dict[str, object] = {}

    def waiter(name: str, wait: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            try:
                got[name] = wait()
            except CeleryTimeout:
                got[name] = "timed out"
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    # The plain wait shows the message really is missing (so the other proves something).
    threads = [waiter("plain", lambda: plain.get(timeout=3 * results.SLICE_S)),
               waiter("sliced", lambda: results.wait(sliced, 30))]
    wait_for(lambda: len(lone_redis.redis_client().pubsub_channels()) == 2, 10,
             "both waiters to subscribe")
    _store_without_message(lone_redis, "t-plain", {"answer": 1})
    _store_without_message(lone_redis, "t-sliced", {"answer": 2})
    for thread in threads:
        thread.join(timeout=40)

    assert got == {"plain": "timed out", "sliced": {"answer": 2}}
