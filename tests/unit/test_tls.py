"""Migration TLS without QEMU: certificates made by tls-init's code, checked by
workers/pki.py; the flag's rules; QEMU's failures told in ferry's words; hosts output."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from scripts.cli import formats, tls_init
from workers import pki
from workers.errors import InvalidInputError, TlsError
from workers.heartbeat import tls_fields
from workers.migration import tls
from workers.migration.params import MigrationFlags, MigrationParams
from workers.pki import Role

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture
def ca(tmp_path: Path) -> tls_init.Ca:
    return tls_init.make_ca(tmp_path / "ca")


@pytest.fixture
def host(ca: tls_init.Ca, tmp_path: Path) -> Path:
    return tls_init.issue_host(ca, tmp_path / "alpha", "alpha", ["127.0.0.1", "alpha.test"])


def test_tls_init_makes_qemus_layout_with_private_keys(host: Path) -> None:
    names = sorted(p.name for p in host.iterdir())
    assert names == ["ca-cert.pem", "client-cert.pem", "client-key.pem", "server-cert.pem",
                     "server-key.pem"]
    assert (host / "server-key.pem").stat().st_mode & 0o777 == 0o600
    assert (host / "client-key.pem").stat().st_mode & 0o777 == 0o600


def test_the_server_certificate_names_the_hosts_addresses_and_is_for_server_auth(
        host: Path) -> None:
    m = pki.check(host, Role.SERVER, "127.0.0.1")
    assert pki.names_of(m.cert) == ["alpha.test", "127.0.0.1"]
    eku = m.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert pki.check(host, Role.SERVER, "alpha.test").cert == m.cert
    client = pki.check(host, Role.CLIENT).cert
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def test_running_tls_init_again_reuses_the_ca(tmp_path: Path) -> None:
    first = tls_init.ca_in(tmp_path / "ca")
    assert tls_init.ca_in(tmp_path / "ca").cert == first.cert


def test_a_missing_file_is_named(host: Path) -> None:
    (host / "server-key.pem").unlink()
    with pytest.raises(TlsError, match=r"TLS file .*/server-key.pem is missing"):
        pki.check(host, Role.SERVER, "127.0.0.1")
    pki.check(host, Role.CLIENT)  # the other role is still fine


def test_a_file_that_is_not_pem_is_named(host: Path) -> None:
    (host / "ca-cert.pem").write_text("garbage\n")
    with pytest.raises(TlsError, match=r"ca-cert.pem holds no PEM certificate"):
        pki.check(host, Role.CLIENT)


def test_a_key_of_another_certificate_is_refused(host: Path) -> None:
    (host / "client-key.pem").write_bytes((host / "server-key.pem").read_bytes())
    with pytest.raises(TlsError, match=r"client-key.pem does not belong to .*client-cert"):
        pki.check(host, Role.CLIENT)


def test_an_expired_certificate_says_when_it_expired(ca: tls_init.Ca, tmp_path: Path) -> None:
    d = tls_init.issue_host(ca, tmp_path / "old", "old", ["127.0.0.1"], days=1,
                            not_before=NOW - datetime.timedelta(days=3))
    with pytest.raises(TlsError, match=r"TLS client certificate .* expired on 20\d\d-"):
        pki.check(d, Role.CLIENT)


def test_a_certificate_not_yet_valid_is_refused(ca: tls_init.Ca, tmp_path: Path) -> None:
    d = tls_init.issue_host(ca, tmp_path / "new", "new", ["127.0.0.1"],
                            not_before=NOW + datetime.timedelta(days=2))
    with pytest.raises(TlsError, match=r"is not valid before"):
        pki.check(d, Role.SERVER, "127.0.0.1")


def test_a_certificate_of_another_ca_is_refused_naming_its_issuer(
        ca: tls_init.Ca, host: Path, tmp_path: Path) -> None:
    other = tls_init.make_ca(tmp_path / "other", cn="other CA")
    (host / "ca-cert.pem").write_bytes(other.cert.public_bytes(Encoding.PEM))
    with pytest.raises(TlsError, match=r"is not signed by a CA in .*ca-cert.pem \(its issuer "
                                       r"is CN=ferry migration CA"):
        pki.check(host, Role.SERVER, "127.0.0.1")


def test_a_ca_bundle_with_the_issuer_anywhere_in_it_is_accepted(
        ca: tls_init.Ca, host: Path, tmp_path: Path) -> None:
    other = tls_init.make_ca(tmp_path / "other", cn="other CA")
    bundle = other.cert.public_bytes(Encoding.PEM) + ca.cert.public_bytes(Encoding.PEM)
    (host / "ca-cert.pem").write_bytes(bundle)
    pki.check(host, Role.SERVER, "127.0.0.1")


def test_a_same_named_impostor_ca_is_refused(ca: tls_init.Ca, host: Path,
                                             tmp_path: Path) -> None:
    impostor = tls_init.make_ca(tmp_path / "impostor")  # same subject, other key
    (host / "ca-cert.pem").write_bytes(impostor.cert.public_bytes(Encoding.PEM))
    with pytest.raises(TlsError, match="is not signed by a CA"):
        pki.check(host, Role.CLIENT)


@pytest.mark.parametrize("address", ["127.0.0.2", "beta.test", "::1"])
def test_a_server_certificate_must_name_the_address_the_source_dials(
        host: Path, address: str) -> None:
    with pytest.raises(TlsError, match=rf"does not name {address}, the address the source "
                                       r"dials \(it names alpha.test, 127.0.0.1\)"):
        pki.check(host, Role.SERVER, address)


def test_a_wildcard_names_one_label(ca: tls_init.Ca) -> None:
    cert, _ = tls_init.leaf(ca, "w", x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, ["*.fleet.test"])
    assert pki.names_address(cert, "h1.fleet.test")
    assert not pki.names_address(cert, "a.h1.fleet.test")
    assert not pki.names_address(cert, "fleet.test")


def test_status_says_which_roles_are_ready_and_the_first_expiry(
        ca: tls_init.Ca, tmp_path: Path) -> None:
    d = tls_init.issue_host(ca, tmp_path / "h", "h", ["127.0.0.1"], days=20)
    st = pki.status(d)
    assert (st["server"], st["client"], st["problems"]) == (True, True, [])
    assert datetime.datetime.fromisoformat(st["expires"]) < NOW + datetime.timedelta(days=21)
    (d / "client-key.pem").unlink()
    st = pki.status(d)
    assert (st["server"], st["client"]) == (True, False)
    assert "client-key.pem is missing" in st["problems"][0]
    assert pki.status(tmp_path / "none") == {"server": False, "client": False,
                                             "expires": None, "problems": []}


def test_tls_status_reads_the_files_again_only_when_they_change(
        ca: tls_init.Ca, tmp_path: Path) -> None:
    d = tls_init.issue_host(ca, tmp_path / "h", "h", ["127.0.0.1"])
    status = pki.TlsStatus(d, required=True)
    first = status.get()
    assert first["required"] is True and first["server"] is True
    assert status.get() == first
    (d / "server-cert.pem").unlink()
    assert status.get()["server"] is False


def test_hosts_fields_from_a_heartbeat_with_and_without_tls() -> None:
    assert tls_fields(None) == {"tls": False, "tls_required": False, "tls_expires": None,
                                "tls_problems": []}
    fields = tls_fields({"server": True, "client": True, "expires": "2030-01-01T00:00:00+00:00",
                         "problems": [], "required": True})
    assert fields["tls"] is True and fields["tls_required"] is True


def test_ferry_hosts_warns_of_certificates_expiring_within_30_days() -> None:
    soon = (NOW + datetime.timedelta(days=10, hours=1)).isoformat()
    later = (NOW + datetime.timedelta(days=90)).isoformat()
    gone = (NOW - datetime.timedelta(days=1)).isoformat()
    hosts = [{"name": "a", "alive": True, "tls_expires": soon, "tls_problems": []},
             {"name": "b", "alive": True, "tls_expires": later, "tls_problems": []},
             {"name": "c", "alive": True, "tls_expires": gone, "tls_problems": []},
             {"name": "d", "alive": False, "tls_expires": gone, "tls_problems": []},
             {"name": "e", "alive": True, "tls_expires": None, "tls_problems": ["bad key"]}]
    lines = formats.tls_warnings(hosts, now=NOW)
    assert lines[0].startswith("warning: host a: migration TLS certificates expire in 10 days")
    assert lines[1].startswith("warning: host c: migration TLS certificates expired")
    assert lines[2] == "warning: host e: bad key"
    assert len(lines) == 3


def _params(**kw: object) -> MigrationParams:
    return MigrationParams(domain="g", source="a", dest="b", **kw)  # type: ignore[arg-type]


def test_the_tls_flag_is_libvirts_65536() -> None:
    assert MigrationFlags.TLS == 65536
    assert "tls" in _params(flags=int(MigrationFlags.LIVE | MigrationFlags.TLS)).flag_names()


def test_tls_with_tunnelled_is_refused_saying_why() -> None:
    flags = MigrationFlags.TLS | MigrationFlags.TUNNELLED | MigrationFlags.PEER2PEER
    with pytest.raises(InvalidInputError, match=r"--tls cannot be used with --tunnelled.*"
                                                r"rediss://"):
        _params(flags=int(flags))


def test_tls_over_a_unix_socket_uri_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="--tls needs a tcp: migration URI"):
        _params(flags=int(MigrationFlags.TLS), migrate_uri="unix:/tmp/m.sock")


def test_the_dial_host_is_the_uris_host() -> None:
    assert tls.dial_host("tcp:10.1.2.3:49152") == "10.1.2.3"
    assert tls.dial_host("tcp:[::1]:49152") == "::1"


P = _params(flags=int(MigrationFlags.TLS | MigrationFlags.LIVE))
CA = Path("/pki/ca-cert.pem")


@pytest.mark.parametrize("desc, words", [
    (None, "dest host b closed the TLS connection during the handshake: it refused this "
           "host's client certificate"),
    ("Cannot write to TLS channel: Input/output error",
     "dest host b ended the TLS session at its start: it refused this host's client "
     "certificate, or its QEMU failed"),
    ("The certificate hasn't got a known issuer",
     "the TLS certificate of dest host b is not signed by a CA this host trusts "
     "(/pki/ca-cert.pem)"),
    ("Certificate does not match the hostname 127.0.0.1",
     "the TLS certificate of dest host b does not name 127.0.0.1, the address this host "
     "dials"),
    ("The certificate has expired", "the TLS certificate of dest host b has expired"),
    ("TLS handshake failed: The TLS connection was non-properly terminated.",
     "TLS handshake with dest host b failed: TLS handshake failed"),
])
def test_qemus_tls_failures_are_told_naming_the_dest(desc: str | None, words: str) -> None:
    err = tls.stream_failure(P, "tcp:127.0.0.1:4000", desc, CA)
    assert err is not None and err.message.startswith(words)


def test_a_failure_that_is_not_about_tls_is_left_to_the_usual_words() -> None:
    assert tls.stream_failure(P, "tcp:127.0.0.1:4000", "Connection refused", CA) is None


def test_the_dests_log_names_what_it_refused() -> None:
    log = ("qemu-system-x86_64: warning: something\n"
           "qemu-system-x86_64: Verify failed: No certificate was found.\n")
    err = tls.verdict("beta", "alpha", log)
    assert err is not None
    assert err.message == ("dest host beta refused the client certificate of alpha (missing, "
                           "or not signed by a CA beta trusts): Verify failed: No certificate "
                           "was found.")
    assert tls.verdict("beta", "alpha", "qemu-system-x86_64: terminating on signal 15\n") \
        is None
    other = tls.verdict("beta", "alpha", "qemu-system-x86_64: The certificate hasn't got a "
                                         "known issuer\n")
    assert other is not None and other.message.endswith(
        "(missing, or not signed by a CA beta trusts): The certificate hasn't got a known "
        "issuer")


def test_tls_init_takes_name_equals_addresses() -> None:
    assert tls_init.parse_host("a=10.0.0.1, a.example") == ("a", ["10.0.0.1", "a.example"])
    for bad in ("a", "a=", "=10.0.0.1"):
        with pytest.raises(InvalidInputError, match="NAME=ADDRESS"):
            tls_init.parse_host(bad)
