"""`ferry tls-init`: a CA and per-host migration certificates, for tests and small fleets.

    ferry tls-init OUT alpha=10.0.0.1 beta=10.0.0.2,beta.example.org

makes OUT/ca/ca-cert.pem and OUT/ca/ca-key.pem (reused when they exist: run it
again to add a host), and for every host OUT/NAME/ with QEMU's and libvirt's
layout: ca-cert.pem, server-cert.pem + server-key.pem (subjectAltName: the
host's migration addresses, which the source dials and checks), client-cert.pem
+ client-key.pem (what the host shows when it sends).  Copy OUT/NAME to that
host's FERRY_TLS_DIR (default <state dir>/pki); keep OUT/ca/ca-key.pem off the
hosts.  Keys are EC P-256, PKCS#8 PEM without a password (QEMU cannot ask for
one), certificates SHA-256 with the extensions QEMU's sanity check wants
(docs/security.md).  Real fleets bring their own PKI.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from workers.errors import InvalidInputError

CA_DAYS = 3650
HOST_DAYS = 365


@dataclass(frozen=True)
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ferry"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically, with `mode` from the start (a key is never readable by others)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()), 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _validity(days: int, not_before: datetime.datetime | None
              ) -> tuple[datetime.datetime, datetime.datetime]:
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    return start, start + datetime.timedelta(days=days)


def make_ca(directory: Path, cn: str = "ferry migration CA", days: int = CA_DAYS) -> Ca:
    """A new CA in `directory` (ca-cert.pem, ca-key.pem)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = _key()
    start, end = _validity(days, None)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(directory / "ca-key.pem", key)
    _write_cert(directory / "ca-cert.pem", cert)
    return Ca(cert, key)


def load_ca(directory: Path) -> Ca:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca-cert.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(),
                                                 password=None)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot load the CA in {directory}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidInputError(f"the CA key in {directory} is not an EC key")
    return Ca(cert, key)


def ca_in(directory: Path) -> Ca:
    """The CA of `directory`, made on first use."""
    if (directory / "ca-cert.pem").exists():
        return load_ca(directory)
    return make_ca(directory)


def _san(addresses: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for a in addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(a)))
        except ValueError:
            names.append(x509.DNSName(a))
    return x509.SubjectAlternativeName(names)


def leaf(ca: Ca, cn: str, usage: x509.ObjectIdentifier, addresses: list[str], *,
         days: int = HOST_DAYS, not_before: datetime.datetime | None = None,
         key: ec.EllipticCurvePrivateKey | None = None
         ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for `usage` (server or client auth) that `ca` signed."""
    key = key or _key()
    start, end = _validity(days, not_before)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=True, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    if addresses:
        builder = builder.add_extension(_san(addresses), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def issue_host(ca: Ca, directory: Path, name: str, addresses: list[str], *,
               days: int = HOST_DAYS, not_before: datetime.datetime | None = None) -> Path:
    """`directory` as a host's FERRY_TLS_DIR: the CA's certificate, a server and a client
    certificate with their keys."""
    if not addresses:
        raise InvalidInputError(f"host {name} needs at least one migration address")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_cert(directory / "ca-cert.pem", ca.cert)
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                        ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        cert, key = leaf(ca, name, usage, addresses, days=days, not_before=not_before)
        _write_key(directory / f"{role}-key.pem", key)
        _write_cert(directory / f"{role}-cert.pem", cert)
    return directory


def parse_host(text: str) -> tuple[str, list[str]]:
    """NAME=ADDRESS[,ADDRESS...]"""
    name, sep, rest = text.partition("=")
    addresses = [a.strip() for a in rest.split(",") if a.strip()]
    if not sep or not name or not addresses:
        raise InvalidInputError(f"expected NAME=ADDRESS[,ADDRESS...], not {text!r}")
    return name, addresses


def cmd_tls_init(a: argparse.Namespace) -> int:
    hosts = [parse_host(h) for h in a.hosts]
    if a.days < 1:
        raise InvalidInputError("--days must be at least 1")
    out = Path(a.out)
    ca = ca_in(out / "ca")
    for name, addresses in hosts:
        path = issue_host(ca, out / name, name, addresses, days=a.days)
        print(f"{name}: {path} ({', '.join(addresses)}): copy to its FERRY_TLS_DIR")
    print(f"CA: {out / 'ca'} (keep ca-key.pem off the hosts)")
    return 0
