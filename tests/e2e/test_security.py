"""Broker authentication, JSON only, and state that is not world-readable."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from config.settings import load
from scripts.testbed.stack import RedisTls, Stack, wait_for
from tasks.client import Client
from tests.certs import KeyPair, ca_and_server, client_of, self_signed
from tests.conftest import Guest, qemu_pids_of
from workers.errors import FerryError


def test_a_redis_with_a_password_works_from_the_broker_url_and_a_wrong_one_is_refused(
        make_guest: Callable[..., Guest]) -> None:
    root = Path(tempfile.mkdtemp(prefix="ferry-pw-", dir="/tmp"))
    st = Stack(root=root)
    try:
        url = st.start_redis(password="s3cret-pw")
        st.start_worker("locked")
        client = Client(load({"FERRY_BROKER_URL": url}))
        guest = make_guest(domain_type="qemu")
        client.call("locked", "define", xml=guest.xml)
        assert client.call("locked", "start", domain=guest.name)["state"] == "running"
        client.call("locked", "destroy", domain=guest.name)

        _refused({"FERRY_BROKER_URL": url.replace("s3cret-pw", "nope")}, "locked")
    finally:
        st.stop(kill_guests=True)
        shutil.rmtree(root, ignore_errors=True)


def _refused(env: dict[str, str], host: str) -> None:
    """A client with these settings cannot talk to the broker at all."""
    with pytest.raises(FerryError, match="cannot reach the broker"):
        Client(load(env)).call(host, "list")


def _move_tunnelled(client: Client, guest: Guest, src: str, dst: str) -> dict[str, Any]:
    """A p2p tunnelled migration slow enough to be asked about midway (a job signal), then
    sped up; the guest's dominfo on the dest once it completed."""
    job = client.migrate(guest.name, src, dst, live=True, p2p=True, tunnelled=True,
                         bandwidth_mib_s=1)
    wait_for(lambda: (job.info().get("data_processed") or 0) > 0, 30,
             "the tunnelled migration to copy memory (a job signal)")
    job.set_speed(0)
    assert job.wait(timeout=60)["result"] == "completed"
    info = client.call(dst, "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("running", "migrated")
    return dict(info)


def test_a_tls_only_redis_carries_tasks_signals_leases_and_a_tunnelled_migration(
        make_guest: Callable[..., Guest]) -> None:
    """Every ferry client of Redis speaks verified TLS from the settings alone (rediss://
    and FERRY_REDIS_CA): Celery, heartbeats, leases, job signals and the tunnel."""
    root = Path(tempfile.mkdtemp(prefix="ferry-tls-", dir="/tmp"))
    ca, server = ca_and_server(root)
    st = Stack(root=root)
    try:
        url = st.start_redis(tls=RedisTls(server.cert, server.key, ca.cert))
        assert url.startswith("rediss://")
        for name in ("tls1", "tls2"):
            st.start_worker(name)  # waits for its heartbeat, read over TLS
        client = Client(load({"FERRY_BROKER_URL": url, "FERRY_REDIS_CA": str(ca.cert)}))
        guest = make_guest(domain_type="qemu")
        client.call("tls1", "define", xml=guest.xml)
        assert client.call("tls1", "start", domain=guest.name)["state"] == "running"
        locks = client.call("tls1", "domlocks", domain=guest.name)
        assert locks["driver"] == "redis" and locks["held_here"]

        info = _move_tunnelled(client, guest, "tls1", "tls2")
        assert qemu_pids_of(guest.uuid) == [info["pid"]]

        _refused({"FERRY_BROKER_URL": url}, "tls1")  # the system's CAs do not know ours
        _refused({"FERRY_BROKER_URL": url.replace("rediss://", "redis://")}, "tls1")
        client.call("tls2", "destroy", domain=guest.name)
    finally:
        st.stop(kill_guests=True)
        shutil.rmtree(root, ignore_errors=True)


def test_a_redis_that_asks_for_client_certificates_works_with_the_ones_in_the_settings(
        make_guest: Callable[..., Guest]) -> None:
    """Mutual TLS: FERRY_REDIS_CERT and FERRY_REDIS_KEY reach every ferry client of Redis
    (Celery, heartbeats, leases, job signals, the tunnel); without them: refused."""
    root = Path(tempfile.mkdtemp(prefix="ferry-mtls-", dir="/tmp"))
    ca, server = ca_and_server(root)
    mine = client_of(root, ca, "ferry-host")
    st = Stack(root=root)
    st.extra_env.update({"FERRY_REDIS_CERT": str(mine.cert), "FERRY_REDIS_KEY": str(mine.key)})
    try:
        url = st.start_redis(tls=RedisTls(server.cert, server.key, ca.cert, auth_clients=True))
        for name in ("mtls1", "mtls2"):
            st.start_worker(name)
        client = Client(st.settings())
        guest = make_guest(domain_type="qemu")
        client.call("mtls1", "define", xml=guest.xml)
        assert client.call("mtls1", "start", domain=guest.name)["state"] == "running"
        _move_tunnelled(client, guest, "mtls1", "mtls2")

        _refused({"FERRY_BROKER_URL": url, "FERRY_REDIS_CA": str(ca.cert)}, "mtls1")
        client.call("mtls2", "destroy", domain=guest.name)
    finally:
        st.stop(kill_guests=True)
        shutil.rmtree(root, ignore_errors=True)


def test_workers_refuse_pickled_messages(stack: Stack, client: Client) -> None:
    client.app.send_task("ferry.list", queue="host.alpha", serializer="pickle")
    log = stack.workers["alpha"].state_dir / "worker.log"
    wait_for(lambda: "pickle" in log.read_text() and "untrusted" in log.read_text(), 15,
             "the worker to refuse the pickled message")


def test_state_directories_and_files_are_not_world_readable(
        stack: Stack, client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name, paused=True)
    state = stack.workers["alpha"].state_dir
    for path in (state / "qemu", state / "run"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    for path in (state / "qemu" / f"{guest.name}.xml", state / "run" / f"{guest.name}.xml"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def _signing(pair: KeyPair, store: Path) -> dict[str, str]:
    return {"FERRY_SIGNING_KEY": str(pair.key), "FERRY_SIGNING_CERT": str(pair.cert),
            "FERRY_SIGNING_CERT_STORE": str(store)}


def test_signed_task_messages_run_on_signing_workers_and_unsigned_or_foreign_ones_are_refused(
        make_guest: Callable[..., Guest]) -> None:
    root = Path(tempfile.mkdtemp(prefix="ferry-sign-", dir="/tmp"))
    certs, store = root / "certs", root / "store"
    certs.mkdir()
    store.mkdir()
    pairs = {n: self_signed(certs, n, f"ferry {n}") for n in ("sign1", "sign2", "cli", "rogue")}
    for name in ("sign1", "sign2", "cli"):  # the rogue's certificate is not trusted
        shutil.copy(pairs[name].cert, store / f"{name}.crt")
    st = Stack(root=root)
    exe = str(Path(sys.executable).with_name("ferry"))

    def cli(signer: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], env={**st.env(), **_signing(pairs[signer], store),
                                                 **env},
                              capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)

    try:
        url = st.start_redis()
        for name in ("sign1", "sign2"):
            st.start_worker(name, env=_signing(pairs[name], store))
        guest, other = make_guest(domain_type="qemu"), make_guest(domain_type="qemu")
        (root / "g.xml").write_text(guest.xml)
        assert cli("cli", "define", "-H", "sign1", str(root / "g.xml")).returncode == 0
        assert cli("cli", "start", "-H", "sign1", guest.name).returncode == 0
        res = cli("cli", "migrate", "-H", "sign1", guest.name, "sign2", "--live", "--json")
        assert res.returncode == 0, res.stderr  # the workers sign the phases they chain
        info = json.loads(cli("cli", "dominfo", "-H", "sign2", guest.name, "--json").stdout)
        assert (info["state"], info["reason"]) == ("running", "migrated")

        log = st.workers["sign1"].state_dir / "worker.log"
        plain = Client(load({"FERRY_BROKER_URL": url}))  # json, unsigned
        plain.app.send_task("ferry.define", kwargs={"xml": other.xml}, queue="host.sign1")
        wait_for(lambda: "untrusted content of type json" in log.read_text(), 15,
                 "the worker to refuse the unsigned message")
        (root / "o.xml").write_text(other.xml)
        res = cli("rogue", "define", "-H", "sign1", str(root / "o.xml"),
                  FERRY_TASK_TIMEOUT_S="3")
        assert res.returncode == 1 and "did not answer" in res.stderr, res.stderr
        wait_for(lambda: "Unknown certificate" in log.read_text(), 15,
                 "the worker to refuse the message signed by an unknown certificate")
        listed = json.loads(cli("cli", "list", "-H", "sign1", "--all", "--json").stdout)
        assert other.name not in [d["name"] for d in listed]
        assert qemu_pids_of(other.uuid) == []
        cli("cli", "destroy", "-H", "sign2", guest.name)
    finally:
        st.stop(kill_guests=True)
        shutil.rmtree(root, ignore_errors=True)
