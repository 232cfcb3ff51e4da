"""The `ferry` command's task messages are Celery's, byte for byte but for ids and times.

Celery's own client sends each call to a real redis-server (no worker: the
message stays in the queue's list); the test reads what it pushed and what it
published, builds the same call with tasks/envelope.py using Celery's ids, and
compares the bytes.
"""

from __future__ import annotations

import base64
import json
import random
import string
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.utils.saferepr import saferepr as celery_saferepr

from config.celery_app import client_app
from config.settings import load
from scripts.testbed.stack import wait_for
from tasks import envelope, quick
from tasks.migrate_client import build_chain
from tasks.migrate_plan import chain_steps, params_from_options


@pytest.fixture(scope="module")
def broker(redis_server: int) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server, password="pw", db=0, socket_timeout=5)
    yield client
    client.close()


class Published:
    """What is published on the task-sent channel while the test runs."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self.pubsub.subscribe(envelope.event_channel(0))
        self.messages: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            msg = self.pubsub.get_message(timeout=0.05)
            if msg and msg["type"] == "message":
                self.messages.append(msg["data"])

    def next(self) -> dict[str, Any]:
        wait_for(lambda: self.messages, 10, "the task-sent event")
        return dict(json.loads(self.messages.pop(0)))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.pubsub.close()


def _celery_sends(broker: redis.Redis, name: str, queue: str, kwargs: dict[str, Any],
                  task_id: str) -> str:
    app = client_app(load({"FERRY_BROKER_URL": _url(broker)}))
    app.send_task(name, kwargs=kwargs, queue=queue, task_id=task_id)
    raw = broker.lpop(queue)
    assert isinstance(raw, bytes), "Celery pushed nothing"
    return raw.decode()


def _url(client: redis.Redis) -> str:
    port = client.connection_pool.connection_kwargs["port"]
    return f"redis://:pw@127.0.0.1:{port}/0"


CALLS: list[tuple[str, dict[str, Any]]] = [
    ("ferry.list", {"all": True}),
    ("ferry.dominfo", {"domain": "web1"}),
    ("ferry.start", {"domain": "it's", "paused": False}),
    ("ferry.define", {"xml": "<domain type='kvm'>\n  <name>x</name>\n" + "  <!-- é ✓ -->\n" * 90
                      + "</domain>\n"}),
    ("ferry.domblkstat", {"domain": "web1", "device": None}),
    ("ferry.qemu_monitor_command", {"domain": "d", "command": "info status", "hmp": True}),
    ("ferry.save", {"domain": "d", "path": "/var/tmp/d.img", "compression": "zstd",
                    "running": False, "paused": True, "bypass_cache": False}),
]


@pytest.mark.parametrize(("name", "kwargs"), CALLS, ids=[c[0] for c in CALLS])
def test_a_task_message_is_the_one_celerys_send_task_pushes(
        broker: redis.Redis, name: str, kwargs: dict[str, Any]) -> None:
    task_id = envelope.new_id()
    theirs = _celery_sends(broker, name, "host.alpha", kwargs, task_id)
    props = json.loads(theirs)["properties"]
    ours = envelope.task_message(
        task=name, task_id=task_id, queue="host.alpha", kwargs=kwargs,
        reply_to=props["reply_to"], delivery_tag=props["delivery_tag"],
        sender=json.loads(theirs)["headers"]["origin"])
    assert ours == theirs
    assert json.loads(theirs)["headers"]["origin"] == envelope.origin()


def test_the_task_sent_event_is_the_one_celery_publishes(broker: redis.Redis) -> None:
    events = Published(broker)
    try:
        time.sleep(0.1)  # the subscription is in place before the first publish
        for name, kwargs in CALLS[:3]:
            task_id = envelope.new_id()
            _celery_sends(broker, name, "host.beta", kwargs, task_id)
            theirs = events.next()
            body = json.loads(base64.b64decode(theirs["body"]))
            ours = envelope.sent_event(
                task=name, task_id=task_id, queue="host.beta", kwargs=kwargs,
                sender=body["hostname"], clock=body["clock"], now=body["timestamp"],
                delivery_tag=theirs["properties"]["delivery_tag"])
            assert json.loads(ours) == theirs
            assert ours == json.dumps(theirs)
    finally:
        events.close()


def test_the_queue_bindings_are_the_ones_kombu_records(broker: redis.Redis) -> None:
    _celery_sends(broker, "ferry.list", "host.gamma", {"all": False}, envelope.new_id())
    for key, member in envelope.bindings("host.gamma"):
        assert broker.smembers(key) == {member.encode()}


@pytest.mark.parametrize("options", [{"live": True}, {"p2p": True, "tunnelled": True},
                                     {"protocol": 2}, {"live": True, "persistent": True,
                                                       "xmlin": "<domain/>"}],
                         ids=["v3", "p2p", "v2", "v3-xmlin"])
def test_a_managed_migrations_first_message_carries_celerys_chain(
        broker: redis.Redis, options: dict[str, Any]) -> None:
    p = params_from_options("web1", "alpha", "beta", **options)
    xml = "<domain><name>web1</name></domain>" if p.protocol == 2 else None
    app = client_app(load({"FERRY_BROKER_URL": _url(broker)}))
    result = build_chain(p, xml, app).apply_async()
    steps = chain_steps(p, xml)
    first, queue, args = steps[0]
    raw = broker.lpop(queue)
    assert isinstance(raw, bytes)
    theirs = raw.decode()
    props = json.loads(theirs)["properties"]
    ours = envelope.task_message(
        task=first.task_name, task_id=first.task_id(p.job_id), queue=queue, args=args,
        chain=quick.later_steps(p, steps, props["reply_to"]), reply_to=props["reply_to"],
        delivery_tag=props["delivery_tag"], sender=envelope.origin())
    assert ours == theirs
    assert result.id == steps[-1][0].task_id(p.job_id)  # the task the caller waits on


def test_saferepr_is_celerys_for_what_json_carries() -> None:
    rnd = random.Random(22)

    def value(depth: int = 0) -> Any:
        kind = rnd.randrange(10 if depth < 5 else 6)
        if kind == 0:
            return rnd.randrange(-10**6, 10**6)
        if kind == 1:
            return rnd.choice([True, False, None])
        if kind == 2:
            return rnd.random() * 1000
        if kind == 3:
            size = rnd.randrange(0, 300 if rnd.random() < 0.8 else 3000)
            return "".join(rnd.choice(string.ascii_letters + " '\"\n\\é✓<>") for _ in range(size))
        if kind == 4:
            return "word " * rnd.randrange(0, 400)
        if kind == 5:
            return ""
        if kind in (6, 7):
            return {"".join(rnd.choice("ab' ") for _ in range(rnd.randrange(1, 12))):
                    value(depth + 1) for _ in range(rnd.randrange(0, 8))}
        if kind == 8:
            return [value(depth + 1) for _ in range(rnd.randrange(0, 8))]
        return tuple(value(depth + 1) for _ in range(rnd.randrange(0, 3)))

    for _ in range(3000):
        v = value()
        for maxlen in (1024, 40, 3, 1):
            assert envelope.saferepr(v, maxlen) == celery_saferepr(v, maxlen, 3), repr(v)[:200]


def test_ids_are_uuid4_text() -> None:
    import uuid

    for _ in range(100):
        text = envelope.new_id()
        assert str(uuid.UUID(text)) == text and uuid.UUID(text).version == 4
