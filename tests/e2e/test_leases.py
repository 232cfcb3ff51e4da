"""Leases move with the guest; graphics clients follow it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from scripts.testbed.stack import Stack, wait_for
from tasks.client import Client
from tests.conftest import Guest, wait_info
from workers.domain_xml import parse_domain_xml
from workers.errors import FerryError
from workers.locks import RedisLocks, resources


def _holders(r: redis.Redis, guest: Guest) -> dict[str, str | None]:
    import json

    d = parse_domain_xml(guest.xml)
    out: dict[str, str | None] = {}
    for res in resources(d):
        raw = r.get(f"ferry:lease:{res}")
        out[res] = None if raw is None else json.loads(raw)["host"]
    return out


def test_a_shared_writable_disk_runs_on_one_host_at_a_time(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    first = make_guest()
    second = make_guest()
    xml = second.xml.replace(str(second.disk), str(first.disk))
    client.call("alpha", "define", xml=first.xml)
    client.call("beta", "define", xml=xml)
    client.call("alpha", "start", domain=first.name)

    with pytest.raises(FerryError) as err:
        client.call("beta", "start", domain=second.name)
    assert f"disk {first.disk} is in use by guest {first.name} on host alpha" in str(err.value)
    assert client.call("beta", "dominfo", domain=second.name)["state"] == "shutoff"

    client.call("alpha", "destroy", domain=first.name)
    assert client.call("beta", "start", domain=second.name)["state"] == "running"
    locks = client.call("beta", "domlocks", domain=second.name)
    assert locks["driver"] == "redis" and locks["held_here"] is True
    assert {h["host"] for h in locks["leases"].values()} == {"beta"}


def test_leases_are_never_held_by_two_hosts_during_a_migration_and_end_on_the_dest(
        stack: Stack, client: Client, make_guest: Callable[..., Guest]) -> None:
    r = redis.Redis.from_url(stack.broker_url)
    guest = make_guest(memory_mib=128)
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    samples: list[dict[str, str | None]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_holders(r, guest))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        client.migrate(guest.name, "alpha", "beta", live=True).wait(timeout=60)
    finally:
        stop.set()
        sampler.join()
    assert len(samples) > 5
    for s in samples:
        held = {h for h in s.values() if h is not None}
        assert len(held) <= 1, f"leases held by two hosts at once: {s}"
    assert set(_holders(r, guest).values()) == {"beta"}


def test_a_lease_stolen_between_perform_and_finish_makes_finish_refuse_and_the_source_resume(
        stack: Stack, client: Client, make_guest: Callable[..., Guest],
        faulty_host: Callable[..., str]) -> None:
    dest = faulty_host("finish3.start=slow")
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    guest.wait_tick()
    job = client.migrate(guest.name, "alpha", dest, live=True)
    wait_for(lambda: job.info()["phase"] == "finish3", 60, "Finish to start", interval=0.02)

    thief = RedisLocks(redis.Redis.from_url(stack.broker_url), 10000)
    definition = parse_domain_xml(guest.xml)
    thief.acquire(definition, "thief-host", os.getpid())
    thief.release(definition, "thief-host")
    with pytest.raises(FerryError) as err:
        job.wait(timeout=60)

    assert "phase finish3" in str(err.value) and "lease domain:" in str(err.value)
    info = wait_info(client, "alpha", guest.name, lambda i: i["state"] == "running")
    assert info["reason"] == "migration_canceled"
    guest.wait_kept_running()
    r = redis.Redis.from_url(stack.broker_url)
    assert set(_holders(r, guest).values()) == {"alpha"}


def test_leases_of_a_host_that_stops_renewing_expire_after_the_ttl_and_not_before(
        stack: Stack, client: Client, make_guest: Callable[..., Guest],
        faulty_host: Callable[..., str]) -> None:
    ttl_s = 3.0
    host = faulty_host("", FERRY_LEASE_TTL_MS=str(int(ttl_s * 1000)),
                       FERRY_HEARTBEAT_INTERVAL_MS="500")
    first = make_guest()
    client.call(host, "define", xml=first.xml)
    qemu = client.call(host, "start", domain=first.name)["pid"]
    second = make_guest()
    client.call("alpha", "define", xml=second.xml.replace(str(second.disk), str(first.disk)))
    worker = stack.workers[host].proc
    assert worker is not None

    # The host dies: its worker stops renewing and its QEMU is gone (QEMU's own image
    # lock would refuse the second start otherwise; the lease is what is tested here).
    os.kill(worker.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    os.kill(qemu, signal.SIGKILL)
    try:
        with pytest.raises(FerryError, match="is in use by"):
            client.call("alpha", "start", domain=second.name)
        assert time.monotonic() - stopped < ttl_s
        started: dict[str, Any] = {}
        errors: list[str] = []

        def try_start() -> bool:
            try:
                started.update(client.call("alpha", "start", domain=second.name))
            except FerryError as exc:
                errors.append(str(exc))
                return False
            return True

        try:
            wait_for(try_start, ttl_s + 5, "the leases to expire", interval=0.2)
        except TimeoutError:
            raise AssertionError(f"still refused: {errors[-1:]}") from None
        assert time.monotonic() - stopped >= ttl_s - 0.6  # the last renewal came before
        assert started["state"] == "running"
    finally:
        os.kill(worker.pid, signal.SIGCONT)


def test_protocol_v2_is_refused_with_the_lease_manager_and_nothing_starts(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    with pytest.raises(FerryError, match="lock manager requires migration protocol v3"):
        client.migrate(guest.name, "alpha", "beta", live=True, protocol=2).wait(timeout=30)
    assert all(d["name"] != guest.name for d in client.call("beta", "list", all=True))
    info = client.call("alpha", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("running", "booted")


def test_spice_clients_are_relocated_before_migrate_and_no_graphics_means_no_section(
        stack: Stack, client: Client, make_guest: Callable[..., Guest]) -> None:
    spice = make_guest(extra_devices="\n    <graphics type='spice' autoport='yes' "
                                     "listen='127.0.0.1'/>")
    plain = make_guest()
    for g in (spice, plain):
        client.call("alpha", "define", xml=g.xml)
        client.call("alpha", "start", domain=g.name)
    job = client.migrate(spice.name, "alpha", "beta", live=True)
    job.wait(timeout=60)
    cookie = client.app.AsyncResult(f"{job.id}.prepare3").get(timeout=5)["cookie"]
    dest_xml = client.call("beta", "dumpxml", domain=spice.name)
    import re

    port = re.search(r"<graphics type=.spice.[^>]*port=.(\d+)", dest_xml)
    assert port is not None and f'port="{port.group(1)}"' in cookie
    log = Path(stack.workers["alpha"].state_dir / "worker.log").read_text()
    mine = [ln for ln in log.splitlines() if f"qmp {spice.name} -> " in ln]
    relocate = next(i for i, ln in enumerate(mine) if "client_migrate_info" in ln)
    migrate = next(i for i, ln in enumerate(mine) if "-> migrate {" in ln)
    assert relocate < migrate
    assert "'hostname': '127.0.0.1'" in mine[relocate]
    assert f"'port': {port.group(1)}" in mine[relocate]

    job = client.migrate(plain.name, "alpha", "beta", live=True)
    job.wait(timeout=60)
    for phase in ("begin3", "prepare3", "perform3"):
        assert "<graphics" not in client.app.AsyncResult(f"{job.id}.{phase}").get(
            timeout=5)["cookie"]
