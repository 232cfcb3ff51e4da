"""Native TLS migration (--tls) on real workers and QEMU, with certificates made by
`ferry tls-init`'s code in a temp dir: managed and p2p, v3 and v2, memory identical
on both sides, and every bad certificate refused in one line naming the host."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from scripts.cli import tls_init
from scripts.testbed.capture import server_hello
from scripts.testbed.guestimage import build_image
from scripts.testbed.stack import Stack, wait_for
from tasks.client import Client
from tests.conftest import CliResult, Guest, pmemsave, qemu_pids_of, remove_guest
from tests.e2e.storagekit import dest_xml
from workers.errors import FerryError

MIB = 1 << 20
A, B = "tlsa", "tlsb"  # hosts with their own TLS dirs (lock manager none: v2 works too)


@dataclass
class Pki:
    root: Path
    ca: tls_init.Ca

    def dir(self, host: str) -> Path:
        return self.root / host

    def issue(self, host: str, addresses: tuple[str, ...] = ("127.0.0.1",),
              ca: tls_init.Ca | None = None, **kw: Any) -> Path:
        """(Re)make `host`'s TLS dir, by the shared CA unless `ca` says otherwise."""
        shutil.rmtree(self.dir(host), ignore_errors=True)
        return tls_init.issue_host(ca or self.ca, self.dir(host), host, list(addresses), **kw)

    def reset(self) -> None:
        for host in (A, B):
            self.issue(host)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    p = Pki(root, tls_init.make_ca(root / "ca"))
    p.reset()
    return p


@pytest.fixture(scope="module")
def tls_hosts(stack: Stack, pki: Pki) -> Iterator[tuple[str, str]]:
    for name in (A, B):
        stack.start_worker(name, env={"FERRY_TLS_DIR": str(pki.dir(name)),
                                      "FERRY_LOCK_MANAGER": "none"})
    yield A, B
    for name in (A, B):
        if name in stack.workers:
            stack.remove_worker(name)


@pytest.fixture
def fresh_pki(pki: Pki) -> Iterator[Pki]:
    """The TLS dirs as tls-init made them, before and after the test."""
    pki.reset()
    yield pki
    pki.reset()


def _boot(client: Client, make_guest: Callable[..., Guest], host: str, **kw: Any) -> Guest:
    guest = make_guest(domain_type="qemu", **kw)
    client.call(host, "define", xml=guest.xml)
    client.call(host, "start", domain=guest.name)
    guest.wait_counter_above(0)
    return guest


VARIANTS = [
    pytest.param({"protocol": 3}, id="managed-v3"),
    pytest.param({"protocol": 2}, id="managed-v2"),
    pytest.param({"protocol": 3, "p2p": True}, id="p2p-v3"),
    pytest.param({"protocol": 2, "p2p": True}, id="p2p-v2"),
    pytest.param({"protocol": 3, "parallel": True, "parallel_connections": 2},
                 id="managed-v3-parallel"),
    pytest.param({"protocol": 3, "p2p": True, "parallel": True}, id="p2p-v3-parallel"),
]


@pytest.mark.parametrize("opts", VARIANTS)
def test_a_tls_migration_moves_a_paused_guest_with_identical_memory(
        opts: dict[str, Any], tls_hosts: tuple[str, str], fresh_pki: Pki, client: Client,
        make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    a, b = tls_hosts
    guest = _boot(client, make_guest, a, memory_mib=64)
    client.call(a, "suspend", domain=guest.name)
    size = 64 << 20
    before = pmemsave(client, a, guest.name, size, tmp_path / "a.mem", start=MIB)

    summary = client.migrate(guest.name, a, b, live=True, tls=True, **opts).wait(timeout=120)

    assert summary["result"] == "completed" and "tls" in summary["flags"]
    assert tls_objects(client, b, guest) == []  # the dest's creds went with the migration
    info = client.call(b, "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("paused", "user")
    assert pmemsave(client, b, guest.name, size, tmp_path / "b.mem", start=MIB) == before
    assert qemu_pids_of(guest.uuid) == [info["pid"]]


def test_a_running_guest_keeps_counting_across_a_tls_migration_and_a_plain_one_after(
        tls_hosts: tuple[str, str], fresh_pki: Pki, client: Client,
        make_guest: Callable[..., Guest]) -> None:
    a, b = tls_hosts
    guest = _boot(client, make_guest, a)
    client.migrate(guest.name, a, b, live=True, tls=True).wait(timeout=120)
    count = guest.wait_counter_above(guest.counters()[-1] + 3)
    # The dest QEMU came in with TLS: its next (plain) migration must not look for it.
    client.migrate(guest.name, b, a, live=True).wait(timeout=120)
    guest.wait_counter_above(count + 3)


def _refused(client: Client, guest: Guest, a: str, b: str, **opts: Any) -> FerryError:
    with pytest.raises(FerryError) as err:
        client.migrate(guest.name, a, b, live=True, tls=True, **opts).wait(timeout=120)
    return err.value


def _still_on_source(client: Client, guest: Guest, a: str, b: str) -> None:
    info = client.call(a, "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) in (("running", "booted"),
                                               ("running", "migration_canceled"))
    assert all(d["name"] != guest.name for d in client.call(b, "list", all=True))
    assert qemu_pids_of(guest.uuid) == [info["pid"]]
    count = guest.counters()[-1]
    guest.wait_counter_above(count + 2)
    # The source's QEMU keeps no TLS object and no TLS parameter of the failed attempt.
    assert tls_objects(client, a, guest) == []
    params = client.call(a, "qemu_monitor_command", domain=guest.name,
                         command='{"execute": "query-migrate-parameters"}')
    assert (params["tls-creds"], params["tls-hostname"]) == ("", "")


def tls_objects(client: Client, host: str, guest: Guest) -> list[str]:
    found = client.call(host, "qemu_monitor_command", domain=guest.name, command=json.dumps(
        {"execute": "qom-list", "arguments": {"path": "/objects"}}))
    return [o["name"] for o in found if "tls" in o["type"]]


def _expired(pki: Pki, host: str) -> None:
    pki.issue(host, days=1, not_before=datetime.datetime.now(datetime.UTC)
              - datetime.timedelta(days=3))


def _other_ca(pki: Pki, host: str) -> None:
    other = tls_init.make_ca(pki.root / "other-ca", cn="another CA")
    pki.issue(host, ca=other)


def _client_from_other_ca(pki: Pki, host: str) -> None:
    """The host trusts both CAs, but its certificates come from one the peer does not
    trust: only the peer's handshake can refuse them."""
    other = tls_init.make_ca(pki.root / "other-ca", cn="another CA")
    directory = pki.issue(host, ca=other)
    both = pki.ca.cert.public_bytes(Encoding.PEM) + other.cert.public_bytes(Encoding.PEM)
    (directory / "ca-cert.pem").write_bytes(both)


def _remove(name: str) -> Callable[[Pki, str], None]:
    def spoil(pki: Pki, host: str) -> None:
        (pki.dir(host) / name).unlink()
    return spoil


def _unreadable(pki: Pki, host: str) -> None:
    path = pki.dir(host) / "server-key.pem"
    path.unlink()
    path.mkdir()  # even root cannot read a directory as a key


# (what is done to which host, the phase that refuses, the words of the error)
BAD = [
    pytest.param(_remove("server-key.pem"), B, "prepare", r"host tlsb: TLS file .*server-key"
                 r"\.pem is missing", id="dest-key-missing"),
    pytest.param(_unreadable, B, "prepare", r"host tlsb: TLS file .*server-key\.pem is a "
                 "directory", id="dest-key-unreadable"),
    pytest.param(_remove("client-cert.pem"), A, "begin3", r"host tlsa: TLS file "
                 r".*client-cert\.pem is missing", id="source-cert-missing"),
    pytest.param(_expired, B, "prepare", r"host tlsb: TLS server certificate .* expired on",
                 id="dest-expired"),
    pytest.param(_expired, A, "begin3", r"host tlsa: TLS client certificate .* expired on",
                 id="source-expired"),
    pytest.param(lambda pki, host: pki.issue(host, ("127.0.0.2",)), B, "prepare",
                 r"host tlsb: TLS server certificate .* does not name 127\.0\.0\.1",
                 id="dest-name-mismatch"),
    pytest.param(_other_ca, B, "perform3", r"host tlsa: the TLS certificate of dest host "
                 r"tlsb is not signed by a CA this host trusts", id="dest-other-ca"),
    pytest.param(_client_from_other_ca, A, "perform3", r"host tlsa: dest host tlsb refused "
                 r"the client certificate of tlsa \(missing, or not signed by a CA tlsb "
                 r"trusts\): Verify failed", id="source-other-ca"),
]


@pytest.mark.parametrize(("spoil", "host", "phase", "words"), BAD)
def test_a_bad_certificate_fails_the_migration_in_one_line_and_the_guest_runs_on(
        spoil: Callable[[Pki, str], None], host: str, phase: str, words: str,
        tls_hosts: tuple[str, str], fresh_pki: Pki, client: Client,
        make_guest: Callable[..., Guest]) -> None:
    a, b = tls_hosts
    guest = _boot(client, make_guest, a)
    spoil(fresh_pki, host)

    err = _refused(client, guest, a, b)

    assert err.phase == phase, str(err)
    assert "\n" not in str(err)
    assert re.search(words, str(err)), str(err)
    _still_on_source(client, guest, a, b)


def test_a_refused_client_certificate_is_told_by_the_dest_in_p2p_too(
        tls_hosts: tuple[str, str], fresh_pki: Pki, client: Client,
        make_guest: Callable[..., Guest]) -> None:
    a, b = tls_hosts
    guest = _boot(client, make_guest, a)
    _client_from_other_ca(fresh_pki, a)
    err = _refused(client, guest, a, b, p2p=True)
    assert err.phase == "perform3", str(err)
    assert "dest host tlsb refused the client certificate of tlsa" in str(err)
    _still_on_source(client, guest, a, b)


def test_a_host_that_requires_tls_refuses_a_plain_migration_in_and_out(
        stack: Stack, tls_hosts: tuple[str, str], fresh_pki: Pki, client: Client,
        make_guest: Callable[..., Guest], ferry: Callable[..., CliResult]) -> None:
    a, _ = tls_hosts
    req = "tlsreq"
    fresh_pki.issue(req, days=10)
    stack.start_worker(req, env={"FERRY_TLS_DIR": str(fresh_pki.dir(req)),
                                 "FERRY_LOCK_MANAGER": "none", "FERRY_MIGRATION_TLS": "required"})
    try:
        guest = _boot(client, make_guest, a)
        with pytest.raises(FerryError) as err:
            client.migrate(guest.name, a, req, live=True).wait(timeout=120)
        assert err.value.phase == "prepare"
        assert "host tlsreq requires TLS for every migration" in str(err.value)
        _still_on_source(client, guest, a, req)

        client.migrate(guest.name, a, req, live=True, tls=True).wait(timeout=120)
        with pytest.raises(FerryError) as err:
            client.migrate(guest.name, req, a, live=True, p2p=True).wait(timeout=120)
        assert err.value.phase == "begin3" and "requires TLS" in str(err.value)
        host = next(h for h in client.hosts() if h["name"] == req)
        assert host["tls"] is True and host["tls_required"] is True
        assert host["tls_expires"] and not host["tls_problems"]
        out = ferry("hosts")
        assert out.rc == 0
        assert re.search(r"tlsreq .* required 20\d\d-", out.out)
        assert re.search(r"warning: host tlsreq: migration TLS certificates expire in "
                         r"(9|10) days", out.err)
        assert "warning: host tlsa" not in out.err
    finally:
        with contextlib.suppress(Exception):  # through ferry: no state file outlives it
            for dom in client.call(req, "list", all=True, timeout=30):
                remove_guest(client, req, dom["name"])
        with contextlib.suppress(Exception):
            stack.remove_worker(req)


def test_certificates_replaced_between_two_migrations_are_used_by_the_second(
        tls_hosts: tuple[str, str], fresh_pki: Pki, client: Client,
        make_guest: Callable[..., Guest]) -> None:
    a, b = tls_hosts
    guest = _boot(client, make_guest, a)
    client.migrate(guest.name, a, b, live=True, tls=True).wait(timeout=120)
    # Both hosts move to a new CA; the old one is no longer trusted anywhere.
    new = tls_init.make_ca(fresh_pki.root / "new-ca", cn="new CA")
    fresh_pki.issue(a, ca=new)
    # beta still holds the old CA: its certificate is refused by alpha's new trust.
    with pytest.raises(FerryError) as err:
        client.migrate(guest.name, b, a, live=True, tls=True).wait(timeout=120)
    assert "not signed by a CA this host trusts" in str(err.value) or \
        "refused this host's client certificate" in str(err.value)
    fresh_pki.issue(b, ca=new)
    client.migrate(guest.name, b, a, live=True, tls=True).wait(timeout=120)
    assert client.call(a, "dominfo", domain=guest.name)["state"] == "running"


RANDOM_AT = 2 << 20  # where the test guest's xorshift32 fill starts (guest.S fill_random)


def guest_random_bytes(size: int) -> bytes:
    """What the test guest's fill_random writes from 2 MiB: xorshift32 words from its
    seed, little-endian."""
    x, words = 0x2545F491, []
    for _ in range(size // 4):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        words.append(x)
    return struct.pack(f"<{len(words)}I", *words)


def patterns(count: int = 16) -> list[bytes]:
    """`count` random 64-byte windows of the guest's random MiB, each inside one page
    (a page travels whole in a plain stream)."""
    data = guest_random_bytes(MIB)
    out = []
    for page in random.sample(range(MIB // 4096), count):
        offset = page * 4096 + 4 * random.randrange((4096 - 64) // 4)
        out.append(data[offset:offset + 64])
    return out


@contextlib.contextmanager
def captured(stack: Stack, out: Path) -> Iterator[dict[str, Any]]:
    """Loopback traffic on the hosts' migration ports while the block runs (in a capture
    process of its own), drained and reassembled when it ends: {"flows": {name: bytes},
    "stats": {...}}."""
    low, high = stack.settings().migration_ports
    proc = subprocess.Popen([sys.executable, "-m", "scripts.testbed.capture",
                             "--ports", f"{low}-{high}", "--out", str(out)],
                            stdin=subprocess.DEVNULL)
    result: dict[str, Any] = {}
    try:
        wait_for(lambda: (out / "ready").exists() or proc.poll() is not None, 10,
                 "the capture to start")
        assert proc.poll() is None, "the capture process could not start"
        yield result
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        result["stats"] = json.loads((out / "stats.json").read_text())
        result["flows"] = {p.stem: p.read_bytes() for p in out.glob("*.bin")}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_loopback_capture_of_a_tls_migration_holds_none_of_the_guests_random_bytes(
        stack: Stack, tls_hosts: tuple[str, str], fresh_pki: Pki, client: Client,
        make_guest: Callable[..., Guest], image_dir: Path, tmp_path: Path) -> None:
    a, b = tls_hosts
    image = build_image(image_dir / "random1.img", random_mib=1, rate_mib_s=0)
    guest = _boot(client, make_guest, a, memory_mib=64, image=image)
    wait_for(lambda: "filled" in guest.serial.read_text(errors="replace"), 60,
             "the guest to fill its random MiB")
    wanted = patterns()

    with captured(stack, tmp_path / "plain") as plain:
        client.migrate(guest.name, a, b, live=True).wait(timeout=120)
    with captured(stack, tmp_path / "tls") as tls:
        client.migrate(guest.name, b, a, live=True, tls=True).wait(timeout=120)

    for cap in (plain, tls):
        assert cap["stats"]["drops"] == 0 and cap["stats"]["truncated"] == 0
    plain_bytes = b"".join(plain["flows"].values())
    tls_bytes = b"".join(tls["flows"].values())
    # The control: the capture sees the guest's bytes in a plain stream...
    assert all(p in plain_bytes for p in wanted)
    assert any(f.startswith(b"QEVM") for f in plain["flows"].values())
    # ... and none of them in the TLS stream, which starts with a TLS handshake record.
    assert len(tls_bytes) > MIB
    assert not [p for p in wanted if p in tls_bytes]
    assert all(f.startswith(b"\x16\x03") for f in tls["flows"].values() if len(f) > 4096)
    hellos = {server_hello(f) for f in tls["flows"].values()} - {None}
    assert hellos == {("TLS 1.3", "TLS_AES_256_GCM_SHA384")}  # QEMU 7.2's default

    # With parallel connections (multifd) each connection makes its own handshake.
    with captured(stack, tmp_path / "parallel") as par:
        client.migrate(guest.name, a, b, live=True, tls=True, parallel=True,
                       parallel_connections=2).wait(timeout=120)
    assert par["stats"]["drops"] == 0 and par["stats"]["truncated"] == 0
    par_bytes = b"".join(par["flows"].values())
    assert len(par_bytes) > MIB and not [p for p in wanted if p in par_bytes]
    assert all(f.startswith(b"\x16\x03") for f in par["flows"].values())
    servers = [server_hello(f) for f in par["flows"].values() if server_hello(f) is not None]
    assert servers == [("TLS 1.3", "TLS_AES_256_GCM_SHA384")] * 3  # the main one, 2 channels


def test_a_storage_copy_with_tls_sends_the_disk_encrypted_and_a_plain_one_in_the_clear(
        stack: Stack, tls_hosts: tuple[str, str], fresh_pki: Pki, client: Client,
        make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    a, b = tls_hosts
    guest = make_guest(domain_type="qemu")
    disk_bytes = os.urandom(MIB)
    with guest.disk.open("ab") as f:  # a random MiB after the boot image: a disk pattern
        f.write(disk_bytes)
    wanted = [disk_bytes[o:o + 64] for o in random.sample(range(0, MIB - 64, 64), 16)]
    client.call(a, "define", xml=guest.xml)
    client.call(a, "start", domain=guest.name)
    guest.wait_counter_above(0)
    there, back = tmp_path / "there" / "disk.img", tmp_path / "back" / "disk.img"
    for d in (there, back):
        d.parent.mkdir()

    with captured(stack, tmp_path / "plain") as plain:
        client.migrate(guest.name, a, b, live=True, copy_storage_all=True,
                       xmlin=dest_xml(guest, there)).wait(timeout=120)
    moved = Guest(guest.name, guest.uuid, dest_xml(guest, there), there, guest.serial)
    with captured(stack, tmp_path / "tls") as tls:
        summary = client.migrate(guest.name, b, a, live=True, copy_storage_all=True, tls=True,
                                 xmlin=dest_xml(moved, back)).wait(timeout=120)

    assert summary["statistics"]["disk_total"] >= 2 * MIB
    assert back.read_bytes()[-MIB:] == disk_bytes  # the disk arrived whole, through TLS
    plain_bytes = b"".join(plain["flows"].values())
    tls_bytes = b"".join(tls["flows"].values())
    assert all(p in plain_bytes for p in wanted)  # the NBD stream in the clear
    assert len(tls_bytes) > 2 * MIB and not [p for p in wanted if p in tls_bytes]
    # The RAM stream starts with a TLS handshake; NBD upgrades to TLS after its greeting
    # (NBD_OPT_STARTTLS), both plain and TLS captures saw an NBD server.
    assert {server_hello(f) for f in tls["flows"].values()} - {None} == \
        {("TLS 1.3", "TLS_AES_256_GCM_SHA384")}
    assert any(f.startswith(b"NBDMAGIC") for f in tls["flows"].values())
    assert any(f.startswith(b"NBDMAGIC") for f in plain["flows"].values())


@pytest.mark.parametrize(("spoil", "host", "words"), [
    (_client_from_other_ca, A, r"dest host tlsb refused the client certificate of tlsa "
                               r"\(missing, or not signed by a CA tlsb trusts\): .*Verify "
                               "failed"),
    (_other_ca, B, r"the TLS certificate of dest host tlsb is not signed by a CA this host "
                   "trusts"),
], ids=["source-other-ca", "dest-other-ca"])
def test_a_storage_copy_refused_in_the_nbd_handshake_is_told_and_the_guest_runs_on(
        spoil: Callable[[Pki, str], None], host: str, words: str,
        tls_hosts: tuple[str, str], fresh_pki: Pki, client: Client,
        make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    a, b = tls_hosts
    guest = _boot(client, make_guest, a)
    spoil(fresh_pki, host)
    dest = tmp_path / "dest" / "disk.img"
    dest.parent.mkdir()
    err = _refused(client, guest, a, b, copy_storage_all=True, xmlin=dest_xml(guest, dest))
    assert err.phase == "perform3" and "\n" not in str(err), str(err)
    assert re.search(rf"host tlsa: {words}", str(err)), str(err)
    _still_on_source(client, guest, a, b)
    assert not dest.exists()  # the image the dest created for the copy went
