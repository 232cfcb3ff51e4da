"""Throwaway X.509 material for tests: a CA, a server certificate for 127.0.0.1 signed by
it (Redis TLS), and self-signed certificates (Celery message signing)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(directory: Path, stem: str, cert: x509.Certificate,
           key: rsa.RSAPrivateKey) -> KeyPair:
    pair = KeyPair(directory / f"{stem}.crt", directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    pair.key.chmod(0o600)
    return pair


def _cert(subject: str, key: rsa.RSAPrivateKey, issuer: x509.Name,
          issuer_key: rsa.RSAPrivateKey, *, ca: bool, ip: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def self_signed(directory: Path, stem: str, cn: str) -> KeyPair:
    key = _key()
    return _write(directory, stem, _cert(cn, key, _name(cn), key, ca=True), key)


def ca_and_server(directory: Path, ip: str = "127.0.0.1") -> tuple[KeyPair, KeyPair]:
    """A CA and a server certificate for `ip` that it signed."""
    ca_key, server_key = _key(), _key()
    ca_cert = _cert("ferry test CA", ca_key, _name("ferry test CA"), ca_key, ca=True)
    server = _cert(ip, server_key, ca_cert.subject, ca_key, ca=False, ip=ip)
    return _write(directory, "ca", ca_cert, ca_key), _write(directory, "server", server,
                                                             server_key)


def client_of(directory: Path, ca: KeyPair, cn: str) -> KeyPair:
    """A client certificate signed by `ca` (Redis with `tls-auth-clients yes`)."""
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    issuer = x509.load_pem_x509_certificate(ca.cert.read_bytes()).subject
    key = _key()
    return _write(directory, cn, _cert(cn, key, issuer, ca_key, ca=False), key)
