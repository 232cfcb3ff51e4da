"""The `ferry` command's own client: where it is used, RESP, results as Celery stores
them, and the imports each command costs."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from config import resp
from config.settings import load
from scripts.testbed.stack import free_port
from tasks import quick
from workers.errors import FerryError, NotFoundError

FERRY = str(Path(sys.executable).with_name("ferry"))


# -- which client ------------------------------------------------------------------------

def _settings(url: str, **env: str) -> Any:
    return load({"FERRY_BROKER_URL": url, **env})


@pytest.mark.parametrize(("url", "expect"), [
    ("redis://127.0.0.1:6379/0", resp.Endpoint("127.0.0.1", 6379)),
    ("redis://localhost", resp.Endpoint("localhost", 6379)),
    ("redis://:s%40cret@10.0.0.1:7000/3",
     resp.Endpoint("10.0.0.1", 7000, db=3, password="s@cret")),
    ("redis://ferry:pw@[::1]:7000/1",
     resp.Endpoint("::1", 7000, db=1, username="ferry", password="pw")),
    ("rediss://broker.example:6380/0", resp.Endpoint("broker.example", 6380, tls=True)),
])
def test_plain_redis_urls_are_read_as_redis_py_reads_them(url: str,
                                                          expect: resp.Endpoint) -> None:
    assert resp.endpoint(_settings(url)) == expect


def test_rediss_takes_the_ca_and_client_certificate_of_the_settings() -> None:
    ep = resp.endpoint(_settings("rediss://b:6380/0", FERRY_REDIS_CA="/pki/ca.pem",
                                 FERRY_REDIS_CERT="/pki/c.pem", FERRY_REDIS_KEY="/pki/k.pem"))
    assert ep == resp.Endpoint("b", 6380, tls=True, ca="/pki/ca.pem", cert="/pki/c.pem",
                               key="/pki/k.pem")
    plain = resp.endpoint(_settings("redis://b:6380/0", FERRY_REDIS_CA="/pki/ca.pem"))
    assert plain is not None and not plain.tls and plain.ca is None


@pytest.mark.parametrize("url", [
    "sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380",
    "unix:///run/redis.sock",
    "redis://127.0.0.1:6379/0?socket_timeout=3",
    "redis://user@127.0.0.1:6379/0",
])
def test_other_broker_urls_go_through_celerys_client(url: str) -> None:
    settings = _settings(url)
    assert resp.endpoint(settings) is None
    assert quick.unusable(settings) == "the broker URL is not a plain redis:// or rediss:// URL"


def test_signed_messages_and_the_switch_go_through_celerys_client() -> None:
    signed = _settings("redis://127.0.0.1:6379/0", FERRY_SIGNING_KEY="/k.pem")
    assert quick.unusable(signed) == "task messages are signed (Celery's auth serializer)"
    off = _settings("redis://127.0.0.1:6379/0", FERRY_CLI_FAST_PATH="off")
    assert quick.unusable(off) == "FERRY_CLI_FAST_PATH is off"
    assert quick.unusable(_settings("rediss://127.0.0.1:6379/0")) is None


def test_auth_and_select_go_ahead_of_the_first_commands() -> None:
    ep = resp.Endpoint("h", 1, db=2, username="u", password="p")
    assert resp.greeting(ep) == [resp.pack("AUTH", "u", "p"), resp.pack("SELECT", 2)]
    assert resp.greeting(resp.Endpoint("h", 1)) == []


# -- RESP ------------------------------------------------------------------------------

def test_replies_are_parsed_whole_or_not_at_all() -> None:
    data = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$-1\r\n+OK\r\n:12\r\n"
    whole = ([b"message", b"ch", None], 30)
    for cut in range(len(data)):
        first = resp._parse(bytearray(data[:cut]), 0)
        assert first == (whole if cut >= 30 else None)
    assert resp._parse(bytearray(data), 30) == ("OK", 35)
    assert resp._parse(bytearray(data), 35) == (12, 40)


def test_error_replies_read_as_redis_py_words_them() -> None:
    wrong, _ = resp._parse(bytearray(b"-WRONGPASS invalid username-password pair\r\n"), 0) \
        or (None, 0)
    assert isinstance(wrong, resp.ReplyError)
    assert str(wrong) == "invalid username-password pair"
    other, _ = resp._parse(bytearray(b"-BUSYKEY Target key name already exists.\r\n"), 0) \
        or (None, 0)
    assert str(other) == "BUSYKEY Target key name already exists."


def test_a_reply_that_is_not_resp_is_a_protocol_error() -> None:
    with pytest.raises(ConnectionError, match='Protocol error, got "H" as reply type byte'):
        resp._parse(bytearray(b"HTTP/1.1 400 Bad Request\r\n"), 0)


# -- results as Celery stores them -------------------------------------------------------

def _meta(status: str, result: Any) -> bytes:
    return json.dumps({"status": status, "result": result, "traceback": None,
                       "children": [], "date_done": "2026-01-01T00:00:00",
                       "task_id": "t"}).encode()


def test_a_success_gives_the_tasks_json() -> None:
    assert quick.outcome(quick.decode(_meta("SUCCESS", {"a": [1, None]})), "h") == \
        {"a": [1, None]}


def test_a_ferry_error_comes_back_as_itself() -> None:
    meta = quick.decode(_meta("FAILURE", {
        "exc_type": "NotFoundError", "exc_module": "workers.errors",
        "exc_message": ["domain 'nope' not found", None, "alpha", None]}))
    with pytest.raises(NotFoundError) as err:
        quick.outcome(meta, "alpha")
    assert str(err.value) == "host alpha: domain 'nope' not found"


def test_a_foreign_error_becomes_a_ferry_error_with_its_text() -> None:
    meta = quick.decode(_meta("FAILURE", {"exc_type": "WeirdError", "exc_module": "nowhere",
                                          "exc_message": ["it broke"]}))
    with pytest.raises(FerryError) as err:
        quick.outcome(meta, "beta")
    assert type(err.value) is FerryError and str(err.value) == "host beta: it broke"


def test_a_stored_failure_naming_no_exception_class_is_refused() -> None:
    meta = quick.decode(_meta("FAILURE", {"exc_type": "system", "exc_module": "os",
                                          "exc_message": "rm -rf /"}))
    with pytest.raises(FerryError, match=r"Expected an exception class, got os\.system"):
        quick.outcome(meta, None)


def test_kombus_typed_values_are_decoded_as_kombu_does() -> None:
    raw = _meta("SUCCESS", {"when": {"__type__": "datetime",
                                     "__value__": "2026-01-01T00:00:00"}})
    from kombu.utils.json import loads

    assert quick.decode(raw) == loads(raw)  # type: ignore[no-untyped-call]  # kombu: no hints


# -- the client against a real redis-server, a stand-in worker storing results -----------

@pytest.fixture(scope="module")
def broker(redis_server: int) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server, password="pw", db=2, socket_timeout=5)
    yield client
    client.close()


class StandIn(threading.Thread):
    """Takes one message from host.t1 and stores results as Celery's Redis backend does:
    STARTED, then the answer; `early`: the answer stored before the client subscribed
    cannot happen, so it is stored without an announcement (found by reading it)."""

    def __init__(self, client: redis.Redis, answer: Any, status: str = "SUCCESS",
                 announce: bool = True) -> None:
        super().__init__(daemon=True)
        self.client, self.answer, self.status, self.announce = client, answer, status, announce
        self.message: dict[str, Any] = {}

    def run(self) -> None:
        item = self.client.brpop(["host.t1"], timeout=10)
        assert item is not None
        self.message = json.loads(item[1])
        task_id = self.message["headers"]["id"]
        key = f"celery-task-meta-{task_id}"
        started = _meta("STARTED", {"pid": 1, "hostname": "ferry@t1"})
        self.client.set(key, started, ex=86400)
        self.client.publish(key, started)
        done = _meta(self.status, self.answer)
        self.client.set(key, done, ex=86400)
        if self.announce:
            self.client.publish(key, done)


def _client(broker: redis.Redis) -> quick.QuickClient:
    port = broker.connection_pool.connection_kwargs["port"]
    broker.set("ferry:host:t1", json.dumps({"name": "t1", "uuid": "u1"}))
    return quick.QuickClient(load({"FERRY_BROKER_URL": f"redis://:pw@127.0.0.1:{port}/2",
                                   "FERRY_TASK_TIMEOUT_S": "10"}))


def test_a_call_sends_the_task_reads_its_result_and_forgets_it(broker: redis.Redis) -> None:
    worker = StandIn(broker, [{"name": "g"}])
    worker.start()
    assert _client(broker).call("t1", "list", all=True) == [{"name": "g"}]
    worker.join(5)
    body = json.loads(base64.b64decode(worker.message["body"]))
    assert worker.message["headers"]["task"] == "ferry.list" and body[1] == {"all": True}
    assert broker.keys("celery-task-meta-*") == []


def test_a_result_stored_without_its_announcement_is_found_by_reading_it(
        broker: redis.Redis) -> None:
    worker = StandIn(broker, "late", announce=False)
    worker.start()
    assert _client(broker).call("t1", "dominfo", domain="g") == "late"


def test_a_failure_is_raised_with_the_hosts_words(broker: redis.Redis) -> None:
    StandIn(broker, {"exc_type": "NotFoundError", "exc_module": "workers.errors",
                     "exc_message": ["domain 'g' not found", None, "t1", None]},
            status="FAILURE").start()
    with pytest.raises(NotFoundError, match="host t1: domain 'g' not found"):
        _client(broker).call("t1", "dominfo", domain="g")


def test_a_host_without_heartbeat_is_an_error_before_anything_is_sent(
        broker: redis.Redis) -> None:
    client = _client(broker)
    with pytest.raises(FerryError, match="host 'gone' is not alive"):
        client.call("gone", "list")
    assert broker.llen("host.gone") == 0


def test_a_wrong_password_is_the_brokers_refusal(broker: redis.Redis) -> None:
    port = broker.connection_pool.connection_kwargs["port"]
    client = quick.QuickClient(load({"FERRY_BROKER_URL": f"redis://:nope@127.0.0.1:{port}/2"}))
    with pytest.raises(FerryError, match=r"cannot reach the broker at .* \(invalid "
                                         r"username-password pair"):
        client.hosts()


# -- what each command imports -----------------------------------------------------------

def _imports(*args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-X", "importtime", FERRY, *args],
                          capture_output=True, text=True, env=full_env, timeout=60)
    mods = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
            if line.startswith("import time:")}
    return proc, mods


HEAVY = {"celery", "kombu", "redis", "asyncio", "tenacity"}


@pytest.mark.parametrize("args", [["--help"], ["list", "--help"], ["migrate", "--help"],
                                  ["nosuchcommand"], ["migrate", "web1"],
                                  ["domblkinfo", "-H", "a"]],
                         ids=["help", "list-help", "migrate-help", "unknown", "missing-dest",
                              "missing-arg"])
def test_help_and_argument_errors_import_neither_celery_nor_redis(args: list[str]) -> None:
    proc, mods = _imports(*args)
    assert proc.returncode in (0, 2), proc.stderr[-500:]
    assert not mods & HEAVY, mods & HEAVY
    assert "config.settings" not in mods


def test_a_command_on_a_plain_broker_imports_neither(tmp_path: Path) -> None:
    proc, mods = _imports("list", "-H", "a", FERRY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert proc.returncode == 1 and "cannot reach the broker" in proc.stderr
    assert not mods & HEAVY, mods & HEAVY
    assert "tasks.quick" in mods


def test_a_sentinel_broker_goes_through_celery() -> None:
    url = f"sentinel://127.0.0.1:{free_port()}"
    proc, mods = _imports("list", "-H", "a", FERRY_BROKER_URL=url)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot reach the broker")
    assert {"celery", "tasks.client"} <= mods


def test_signing_goes_through_celery(tmp_path: Path) -> None:
    proc, mods = _imports("list", "-H", "a",
                          FERRY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0",
                          FERRY_SIGNING_KEY=str(tmp_path / "k.pem"),
                          FERRY_SIGNING_CERT=str(tmp_path / "c.pem"),
                          FERRY_SIGNING_CERT_STORE=str(tmp_path))
    assert proc.returncode == 1
    assert "message signing:" in proc.stderr and "does not exist" in proc.stderr
    assert {"celery", "tasks.client"} <= mods
