"""Hostile messages that reach a worker directly: task messages sent by name with wrong
types or missing fields, hostile cookies at Prepare, job signals with unknown ops or bad
arguments.  Each is one clear error, and nothing changes: no guest, no QEMU, no job
record, no admission slot, no new speed."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from scripts.testbed.stack import Stack, wait_for
from tasks.client import Client
from tests.conftest import Guest, qemu_pids_of
from workers.errors import FerryError
from workers.jobsignals.protocol import job_channel
from workers.jobsignals.sender import send_signal

PARAMS = {"domain": "g-hostile", "source": "alpha", "dest": "beta", "job_id": "j-hostile"}

MESSAGES = [
    pytest.param("ferry.define", [], {"xml": 5}, "'xml' must be a string", id="define-int"),
    pytest.param("ferry.define", [], {}, "missing a required argument: 'xml'",
                 id="define-missing"),
    pytest.param("ferry.start", [], {"domain": ["g"]}, "'domain' must be a string",
                 id="start-list"),
    pytest.param("ferry.start", [], {"domain": "g", "paused": "yes"},
                 "'paused' must be true or false", id="start-paused-str"),
    pytest.param("ferry.destroy", [], {"domain": "g", "force": True},
                 "unexpected keyword argument 'force'", id="destroy-unknown-field"),
    pytest.param("ferry.save", [], {"domain": "g", "path": 7}, "'path' must be a string",
                 id="save-path-int"),
    pytest.param("ferry.qemu_monitor_command", [],
                 {"domain": "g", "command": {"execute": "quit"}}, "'command' must be a string",
                 id="monitor-object"),
    pytest.param("ferry.begin3", [[1, 2]], {}, "'params' must be a JSON object",
                 id="begin3-list"),
    pytest.param("ferry.begin3", [{"domain": "g", "source": "alpha"}], {}, "lack dest",
                 id="begin3-missing"),
    pytest.param("ferry.begin3", [{**PARAMS, "flags": "1"}], {}, "'flags'",
                 id="begin3-flags-str"),
    pytest.param("ferry.prepare3", [{"xml": "<domain/>"}], {}, "lacks params",
                 id="prepare3-no-params"),
    pytest.param("ferry.prepare3", [{"params": PARAMS, "cookie": 5}], {},
                 "'cookie' has the wrong type", id="prepare3-cookie-int"),
    pytest.param("ferry.perform3", ["state"], {}, "'state' must be a JSON object",
                 id="perform3-str"),
    pytest.param("ferry.confirm3", [{"params": PARAMS, "phases": ["x"]}], {}, "'phases'",
                 id="confirm3-phases"),
    pytest.param("ferry.finish3", [{"params": {**PARAMS, "bandwidth_mib_s": -1}}], {},
                 "bandwidth", id="finish3-bandwidth"),
    pytest.param("ferry.migrate_p2p", [{**PARAMS, "domain": 5}], {}, "'domain'",
                 id="p2p-domain-int"),
]


def _ferry_keys(r: redis.Redis) -> dict[str, Any]:
    """Every ferry record but the heartbeats, with the admission lines' contents."""
    out: dict[str, Any] = {}
    for raw in r.scan_iter("ferry:*"):
        key = raw.decode()
        if key.startswith("ferry:host:"):
            continue
        out[key] = r.lrange(key, 0, -1) if key.startswith("ferry:slots:") else True
    return out


@pytest.fixture
def unchanged(stack: Stack, client: Client) -> Iterator[Callable[[], None]]:
    """A check that no host's guests, QEMUs or ferry records changed since the test began."""
    r = stack.redis_client()
    hosts = ("alpha", "beta")
    before = ({h: client.call(h, "list", all=True) for h in hosts}, stack.guest_pids(),
              _ferry_keys(r))
    # What earlier tests left with a time to live (the leases of a host they removed) may
    # expire meanwhile: that is not a change.
    expiring = {key for key in before[2] if r.pttl(key) > 0}

    def check() -> None:
        keys = _ferry_keys(r)
        gone = (before[2].keys() - keys.keys()) & expiring
        after = ({h: client.call(h, "list", all=True) for h in hosts}, stack.guest_pids(), keys)
        assert after == (before[0], before[1], {k: v for k, v in before[2].items()
                                                 if k not in gone})

    yield check


@pytest.mark.parametrize("task, args, kwargs, needle", MESSAGES)
def test_a_task_message_with_wrong_types_or_fields_is_refused_and_changes_nothing(
        task: str, args: list[Any], kwargs: dict[str, Any], needle: str, client: Client,
        unchanged: Callable[[], None]) -> None:
    queue = "host.beta" if task in ("ferry.prepare3", "ferry.finish3") else "host.alpha"
    result = client.app.send_task(task, args=args, kwargs=kwargs, queue=queue)
    try:
        result.get(timeout=20, propagate=False)
        assert result.state == "FAILURE"
        text = str(result.result)
        assert needle in text and "\n" not in text, text
        assert type(result.result).__name__ == "InvalidInputError"
    finally:
        result.forget()
    unchanged()


LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE qemu-migration [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>
<qemu-migration><name>&b;</name></qemu-migration>"""
XXE = ('<!DOCTYPE q [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
       "<qemu-migration><name>&x;</name></qemu-migration>")


def _cookie(guest: Guest, extra: str = "") -> str:
    return (f"<qemu-migration><name>{guest.name}</name><uuid>{guest.uuid}</uuid>"
            "<hostname>alpha</hostname><hostuuid>8b3f4dc4-6a8e-5f9b-94a5-4c35babd8d95"
            f"</hostuuid>{extra}</qemu-migration>")


COOKIES: dict[str, tuple[Callable[[Guest], str], str]] = {
    "billion laughs": (lambda g: LAUGHS, "entity declaration"),
    "external entity": (lambda g: XXE, "entity declaration"),
    "too big": (lambda g: _cookie(g, "<x>" + "y" * 16400 + "</x>"), "16384"),
    "wrong root": (lambda g: f"<domain><name>{g.name}</name></domain>", "root element"),
    "duplicate uuid": (lambda g: _cookie(g, f"<uuid>{g.uuid}</uuid>"), "more than one <uuid>"),
    "bad uuid": (lambda g: _cookie(g).replace(g.uuid, "not-a-uuid"), "not a valid UUID"),
    "mandatory unknown feature": (lambda g: _cookie(g, "<feature name='cpu'/>"), "'cpu'"),
}


@pytest.mark.parametrize("case", list(COOKIES))
def test_a_hostile_cookie_is_refused_by_prepare_and_nothing_starts_on_the_dest(
        case: str, client: Client, make_guest: Callable[..., Guest],
        unchanged: Callable[[], None]) -> None:
    from celery import chain

    guest = make_guest(domain_type="qemu")
    make_cookie, needle = COOKIES[case]
    params = {**PARAMS, "domain": guest.name, "job_id": f"j-cookie-{guest.name}"}
    state = {"params": params, "xml": guest.xml, "cookie": make_cookie(guest)}
    # as a chain would: Finish runs in its cancelled form and gives the admission slot back
    result = chain(client.app.signature("ferry.prepare3", args=(state,), queue="host.beta"),
                   client.app.signature("ferry.finish3", queue="host.beta")).apply_async()
    try:
        out = result.get(timeout=30)
        assert out["error"] is not None and needle in out["error"]["text"], out["error"]
        assert out["error"]["phase"] == "prepare" and out["error"]["host"] == "beta"
    finally:
        result.forget()
    assert qemu_pids_of(guest.uuid) == []
    unchanged()


SIGNALS: list[tuple[str, Any, str]] = [
    ("explode", {}, "unknown job signal 'explode'"),
    ("setspeed", {"bandwidth": "fast"}, "integer 'bandwidth'"),
    ("setspeed", {"bandwidth": True}, "integer 'bandwidth'"),
    ("setspeed", {"bandwidth": 2.5}, "integer 'bandwidth'"),
    ("setspeed", {"bandwidth": -5}, "'bandwidth' must be in 0.."),
    ("setspeed", {"bandwidth": 1 << 60}, "'bandwidth' must be in 0.."),
    ("setspeed", {}, "integer 'bandwidth'"),
    ("setmaxdowntime", {"downtime": 0}, "'downtime' must be in 1.."),
    ("setmaxdowntime", {"downtime": 10**12}, "'downtime' must be in 1.."),
    ("setspeed", "fast", "args must be a JSON object"),
]


def test_job_signals_with_unknown_ops_or_bad_arguments_are_refused_and_the_job_goes_on(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(domain_type="qemu")
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    job = client.migrate(guest.name, "alpha", "beta", live=True, bandwidth_mib_s=1)
    wait_for(lambda: (job.info().get("data_processed") or 0) > 0, 30,
             "the migration to copy memory")
    for op, args, needle in SIGNALS:
        with pytest.raises(FerryError) as err:
            send_signal(client.redis, guest.uuid, op, args, timeout_s=5)
        assert needle in str(err.value) and "\n" not in str(err.value), (op, args, err.value)
    # not JSON at all, or no reply_to: ignored, and the owner still answers the next one
    client.redis.publish(job_channel(guest.uuid), "{not json")
    client.redis.publish(job_channel(guest.uuid), json.dumps({"op": "abort"}))
    assert job.get_speed() == 1
    info = job.info()
    assert info["type"] == "unbounded" and info["phase"] == "perform3"
    job.abort()
    with pytest.raises(FerryError, match="abort"):
        job.wait(timeout=60)
    state = client.call("alpha", "dominfo", domain=guest.name)
    assert state["state"] == "running"
    assert qemu_pids_of(guest.uuid) == [state["pid"]]


def test_a_prepare_sent_on_its_own_that_fails_gives_its_incoming_place_back_at_once(
        client: Client, make_guest: Callable[..., Guest],
        unchanged: Callable[[], None]) -> None:
    """No Finish follows a lone message: the failed Prepare itself leaves the line."""
    guest = make_guest(domain_type="qemu")
    params = {**PARAMS, "domain": guest.name, "job_id": f"j-lone-{guest.name}"}
    state = {"params": params, "xml": guest.xml, "cookie": LAUGHS}
    result = client.app.send_task("ferry.prepare3", args=(state,), queue="host.beta")
    try:
        out = result.get(timeout=30)
        assert out["error"] is not None and "entity declaration" in out["error"]["text"]
    finally:
        result.forget()
    assert qemu_pids_of(guest.uuid) == []
    unchanged()


def test_an_incoming_guest_of_a_made_up_job_is_discarded_with_its_place_in_line(
        stack: Stack, client: Client, make_guest: Callable[..., Guest],
        faulty_host: Callable[..., str]) -> None:
    """Prepare succeeds for a job nobody runs; once the job is known to be over the
    sweeper discards the incoming QEMU and gives its place in the line back."""
    host = faulty_host("", FERRY_SWEEP_INTERVAL_S="1")
    guest = make_guest(domain_type="qemu")
    job_id = f"j-madeup-{guest.name}"
    params = {**PARAMS, "domain": guest.name, "dest": host, "job_id": job_id}
    state = {"params": params, "xml": guest.xml, "cookie": _cookie(guest)}
    result = client.app.send_task("ferry.prepare3", args=(state,), queue=f"host.{host}")
    try:
        out = result.get(timeout=60)
        assert out["error"] is None and out["uri"], out
    finally:
        result.forget()
    r = stack.redis_client()
    line = f"ferry:slots:{host}:in"
    assert [e.split(b"|")[0] for e in r.lrange(line, 0, -1)] == [job_id.encode()]
    assert len(qemu_pids_of(guest.uuid)) == 1
    r.set(f"ferry:jobended:{job_id}", "1", ex=600)
    wait_for(lambda: not qemu_pids_of(guest.uuid), 30, "the sweeper to discard the guest")
    wait_for(lambda: r.llen(line) == 0, 10, "its place in the line to be given back")
