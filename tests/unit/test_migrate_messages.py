"""`ferry migrate` sends the same first message through its own client as through
Celery's, for every option the command has, today's and any added later.

Both clients run the real command (`ferry migrate ... --no-wait`) against a real
redis-server with two host records and no worker: the chain's first message stays in
its queue, and the test compares what each client pushed, byte for byte but for the
ids (job, reply queue, delivery tag).  Every option of the migrate parser is tried
on its own (with the options it needs, REQUIRES) and must change the message: an
option the command forgot to pass on, or one tasks/migrate_plan.py does not know,
fails here.
"""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from config.settings import Settings, load
from scripts.cli import migrate_cmd
from scripts.cli.main import build_parser, parse
from tasks import quick
from tasks.client import Client
from tasks.connection import Connection
from workers.host_records import host_key

V2_XML = "<domain type='kvm'><name>web1</name><uuid>1</uuid></domain>"

#: a value for each migrate option that takes one (by argparse dest)
VALUES: dict[str, str] = {
    "migrateuri": "tcp:127.0.0.1:49152", "bandwidth": "100", "timeout": "30",
    "max_downtime": "250", "protocol": "2", "migrate_disks": "vda,vdb", "disks_port": "10809",
    "parallel_connections": "4", "comp_methods": "xbzrle", "comp_xbzrle_cache": "67108864",
    "comp_zstd_level": "5", "comp_zlib_level": "3",
}
#: the options an option needs beside it (by argparse dest)
REQUIRES: dict[str, list[str]] = {
    "tunnelled": ["--p2p"], "offline": ["--persistent"], "postcopy": ["--live"],
    "migrate_disks": ["--copy-storage-all"], "disks_port": ["--copy-storage-all"],
    "parallel_connections": ["--parallel"], "comp_methods": ["--compressed"],
    "comp_xbzrle_cache": ["--compressed"],
    "comp_zstd_level": ["--parallel", "--compressed", "--comp-methods", "zstd"],
    "comp_zlib_level": ["--parallel", "--compressed", "--comp-methods", "zlib"],
}
#: options together, as operators combine them
COMBINATIONS: list[list[str]] = [
    ["--live", "--persistent", "--undefinesource", "--bandwidth", "50", "--max-downtime", "80"],
    ["--live", "--copy-storage-all", "--migrate-disks", "vda", "--disks-port", "10900",
     "--bandwidth", "200"],
    ["--live", "--copy-storage-inc", "--unsafe", "--auto-converge", "--abort-on-error"],
    ["--live", "--parallel", "--parallel-connections", "8", "--compressed", "--comp-methods",
     "zstd", "--comp-zstd-level", "9"],
    ["--live", "--parallel", "--compressed", "--comp-methods", "zlib", "--comp-zlib-level", "9"],
    ["--live", "--compressed", "--comp-methods", "xbzrle", "--comp-xbzrle-cache", "1048576",
     "--postcopy", "--timeout", "60"],
    ["--live", "--p2p", "--tunnelled", "--parallel", "--parallel-connections", "3"],
    ["--live", "--p2p", "--copy-storage-inc", "--migrate-disks", "vda,vdc"],
    ["--p2p", "--live", "--compressed", "--migrateuri", "tcp:127.0.0.2"],
    ["--protocol", "2", "--live", "--persistent", "--suspend"],
    ["--offline", "--persistent", "--change-protection"],
]


@pytest.fixture(scope="module")
def settings(redis_server: int) -> Iterator[Settings]:
    """Two live host records (alpha, beta) on the test's redis-server."""
    r = redis.Redis(port=redis_server, password="pw", socket_timeout=5)
    for name in ("alpha", "beta"):
        r.set(host_key(name), json.dumps({"uuid": f"uuid-{name}", "address": "127.0.0.1",
                                          "guests": [], "version": "test"}))
    r.close()
    yield load({"FERRY_BROKER_URL": f"redis://:pw@127.0.0.1:{redis_server}/0"})


@pytest.fixture(scope="module")
def clients(settings: Settings) -> dict[str, Any]:
    assert quick.unusable(settings) is None
    return {"celery": Client(settings), "quick": quick.QuickClient(settings)}


@pytest.fixture(autouse=True)
def _v2_xml(monkeypatch: pytest.MonkeyPatch) -> None:
    """v2's caller fetches the XML first (a task no worker here answers)."""
    def call(self: Any, host: str, task: str, timeout: float | None = None,
             **kwargs: Any) -> Any:
        assert (host, task, kwargs) == ("alpha", "dumpxml",
                                        {"domain": "web1", "migratable": True})
        return V2_XML

    monkeypatch.setattr(Connection, "call", call)
    monkeypatch.setattr(quick.QuickClient, "call", call)


def _pushed(settings: Settings) -> bytes:
    """The one message waiting in the hosts' queues (taken out)."""
    r = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
    try:
        found = [m for q in ("host.alpha", "host.beta") for m in r.lrange(q, 0, -1)]
        r.delete("host.alpha", "host.beta")
    finally:
        r.close()
    assert len(found) == 1, f"expected one message, found {len(found)}"
    return bytes(found[0])


def _send(which: str, clients: dict[str, Any], settings: Settings, args: list[str],
          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
          ) -> tuple[str, str]:
    """Run `ferry migrate web1 beta -H alpha ARGS --no-wait --json` with one client; the
    message it pushed (envelope, body), ids replaced by names."""
    monkeypatch.setattr(migrate_cmd, "client", lambda: clients[which])
    a = parse(["migrate", "web1", "beta", "-H", "alpha", "--no-wait",
                                   "--json", *args])
    assert a.handler(a) == 0
    job_id = json.loads(capsys.readouterr().out)["job_id"]
    message = json.loads(_pushed(settings))
    body = base64.b64decode(message.pop("body")).decode()
    props = message["properties"]
    props["delivery_tag"] = "TAG"
    reply_to = props["reply_to"]
    envelope = json.dumps(message)
    return tuple(text.replace(job_id, "JOB").replace(reply_to, "REPLY")  # type: ignore[return-value]
                 for text in (envelope, body))


def _both(clients: dict[str, Any], settings: Settings, args: list[str],
          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
          ) -> tuple[str, str]:
    theirs = _send("celery", clients, settings, args, monkeypatch, capsys)
    ours = _send("quick", clients, settings, args, monkeypatch, capsys)
    assert ours[1] == theirs[1], f"body differs for {args}"
    assert ours[0] == theirs[0], f"headers or properties differ for {args}"
    return ours


def _migrate_actions() -> list[argparse.Action]:
    sub = next(a for a in build_parser(only="migrate")._actions
               if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices["migrate"]._actions
            if a.option_strings and a.dest not in migrate_cmd.NOT_OPTIONS and a.dest != "help"]


def _argv(action: argparse.Action) -> list[str]:
    flag = action.option_strings[-1]
    if action.nargs == 0:  # store_true
        return [*REQUIRES.get(action.dest, []), flag]
    assert action.dest in VALUES, f"give {flag} a value in VALUES"
    return [*REQUIRES.get(action.dest, []), flag, VALUES[action.dest]]


def test_every_migrate_option_changes_the_message_and_both_clients_send_the_same(
        clients: dict[str, Any], settings: Settings,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    actions = _migrate_actions()
    assert len(actions) >= 24, [a.dest for a in actions]  # the parser was read
    plain = _both(clients, settings, [], monkeypatch, capsys)
    for action in actions:
        args = _argv(action)
        base = _both(clients, settings, args[:-2 if action.nargs != 0 else -1],
                     monkeypatch, capsys) if REQUIRES.get(action.dest) else plain
        with_it = _both(clients, settings, args, monkeypatch, capsys)
        assert with_it != base, f"{action.option_strings[-1]} does not reach the message"


def test_the_xml_option_travels_in_both_clients_messages(
        clients: dict[str, Any], settings: Settings, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    xml = tmp_path / "dest.xml"
    xml.write_text("<domain type='kvm'>\n  <name>web1</name>\n  <!-- é ✓ -->\n</domain>\n")
    _, body = _both(clients, settings, ["--live", "--xml", str(xml)], monkeypatch, capsys)
    assert "<!-- \\u00e9 \\u2713 -->" in body


@pytest.mark.parametrize("args", COMBINATIONS, ids=[" ".join(c[:4]) for c in COMBINATIONS])
def test_combined_options_give_both_clients_the_same_message(
        clients: dict[str, Any], settings: Settings, args: list[str],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _both(clients, settings, args, monkeypatch, capsys)


@pytest.mark.parametrize("args", [["--parallel-connections", "0"],
                                  ["--compressed", "--comp-methods", "zstd"],
                                  ["--tunnelled"], ["--colour"]])
def test_a_refused_option_is_refused_alike_and_nothing_is_sent(
        clients: dict[str, Any], settings: Settings, args: list[str],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    errors = []
    for which in ("celery", "quick"):
        monkeypatch.setattr(migrate_cmd, "client", lambda w=which: clients[w])
        with pytest.raises((Exception, SystemExit)) as caught:
            a = parse(["migrate", "web1", "beta", "-H", "alpha",
                                           "--no-wait", *args])
            a.handler(a)
        errors.append(str(caught.value))
    assert errors[0] == errors[1]
    capsys.readouterr()
    r = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
    try:
        assert r.llen("host.alpha") == r.llen("host.beta") == 0
    finally:
        r.close()


def test_a_dry_run_asks_the_same_tasks_through_both_clients(
        clients: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    asked: dict[str, list[Any]] = {"celery": [], "quick": []}
    replies = {"dryrun_begin": {"xml": "<domain/>", "disks": [{"target": "vda"}],
                                "sources": {"vda": "/img/vda.qcow2"}},
               "dryrun_prepare": {"nbd": {"port": 10809}, "copy_bytes": 1 << 20,
                                  "disks": [{"target": "vda", "copy": True}]}}
    for which in ("celery", "quick"):
        def call(self: Any, host: str, task: str, timeout: float | None = None,
                 w: str = which, **kwargs: Any) -> Any:
            params = json.loads(json.dumps(kwargs.get("params", {})))
            params.pop("job_id", None)
            asked[w].append((host, task, params, {k: v for k, v in kwargs.items()
                                                  if k != "params"}))
            return replies[task]

        monkeypatch.setattr(Connection, "call", call)
        monkeypatch.setattr(quick.QuickClient, "call", call)
        monkeypatch.setattr(migrate_cmd, "client", lambda w=which: clients[w])
        a = parse(["migrate", "web1", "beta", "-H", "alpha", "--json",
                                       "--dry-run", "--live", "--copy-storage-all"])
        assert a.handler(a) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["disks"] == [{"target": "vda", "copy": True,
                                    "source_path": "/img/vda.qcow2"}]
    assert [t[1] for t in asked["quick"]] == ["dryrun_begin", "dryrun_prepare"]
    assert asked["quick"] == asked["celery"]
