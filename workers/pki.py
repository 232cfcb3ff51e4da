"""A host's migration TLS material, checked in Python before QEMU sees it.

The directory has QEMU's and libvirt's layout (FERRY_TLS_DIR, default
<state dir>/pki): ca-cert.pem (the CA bundle the host trusts), server-cert.pem
and server-key.pem (what an incoming QEMU shows), client-cert.pem and
client-key.pem (what an outgoing QEMU shows).  QEMU reads the files when its
tls-creds-x509 object is added and is the authority; these checks exist so
that an operator reads one line in ferry's words ("expired on ...", "does not
name 127.0.0.1") instead of a bare "TLS handshake failed", and so that the
heartbeat can say when the certificates expire.  Pure apart from reading the
files: every rule has a unit test on certificates made in a temp dir.
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from workers.errors import TlsError

CA_FILE = "ca-cert.pem"


class Role(enum.Enum):
    """Which end of a migration stream a host's QEMU is."""

    SERVER = "server"  # the dest: listens, shows server-cert.pem, asks for a client cert
    CLIENT = "client"  # the source: dials, shows client-cert.pem, checks the dest's name

    @property
    def cert_file(self) -> str:
        return f"{self.value}-cert.pem"

    @property
    def key_file(self) -> str:
        return f"{self.value}-key.pem"

    def files(self) -> tuple[str, str, str]:
        return (CA_FILE, self.cert_file, self.key_file)


@dataclass(frozen=True)
class Material:
    """The loaded files of one role: the CA bundle, the leaf, its key."""

    directory: Path
    role: Role
    cas: list[x509.Certificate]
    cert: x509.Certificate
    key_public: bytes  # the key's public half, to compare with the certificate's


def _read(directory: Path, name: str) -> bytes:
    path = directory / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"TLS file {path} is missing (FERRY_TLS_DIR is {directory})") from None
    except IsADirectoryError:
        raise TlsError(f"TLS file {path} is a directory") from None
    except OSError as exc:
        raise TlsError(f"TLS file {path} cannot be read: {exc.strerror}") from None


def _certs(directory: Path, name: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(_read(directory, name))
    except ValueError:
        certs = []
    if not certs:
        raise TlsError(f"TLS file {directory / name} holds no PEM certificate")
    return certs


def _public(key_or_cert: Any) -> bytes:
    return bytes(key_or_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def load(directory: Path, role: Role) -> Material:
    """The CA bundle, certificate and key of `role`; TlsError if one is missing or bad."""
    cas = _certs(directory, CA_FILE)
    cert = _certs(directory, role.cert_file)[0]
    key_pem = _read(directory, role.key_file)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsError(f"TLS key {directory / role.key_file} cannot be loaded (a PEM "
                       f"private key without a password is needed): {exc}") from None
    return Material(directory, role, cas, cert, _public(key))


def _when(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def check_validity(cert: x509.Certificate, what: str,
                   now: datetime.datetime | None = None) -> None:
    now = now or datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= now:
        raise TlsError(f"{what} expired on {_when(cert.not_valid_after_utc)}")
    if cert.not_valid_before_utc > now:
        raise TlsError(f"{what} is not valid before {_when(cert.not_valid_before_utc)}")


def issuer_of(cert: x509.Certificate, cas: list[x509.Certificate]) -> x509.Certificate | None:
    """The CA of the bundle that signed `cert`, if any."""
    for ca in cas:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca
    return None


def names_of(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses in the certificate's subjectAltName."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def names_address(cert: x509.Certificate, address: str) -> bool:
    """Whether the subjectAltName covers `address` as GnuTLS checks it (an IP against
    IP entries, a name against DNS entries, one leading '*.' label)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    wanted = address.lower().rstrip(".")
    for name in san.get_values_for_type(x509.DNSName):
        name = name.lower().rstrip(".")
        if name == wanted:
            return True
        if name.startswith("*.") and "." in wanted and wanted.split(".", 1)[1] == name[2:]:
            return True
    return False


def check(directory: Path, role: Role, address: str | None = None,
          now: datetime.datetime | None = None) -> Material:
    """Everything QEMU would refuse, in ferry's words: files, key vs certificate,
    validity, CA chain, and (server) that the certificate names `address`."""
    m = load(directory, role)
    what = f"TLS {role.value} certificate {directory / role.cert_file}"
    if _public(m.cert) != m.key_public:
        raise TlsError(f"TLS key {directory / role.key_file} does not belong to "
                       f"{directory / role.cert_file}")
    check_validity(m.cert, what, now)
    ca = issuer_of(m.cert, m.cas)
    if ca is None:
        raise TlsError(f"{what} is not signed by a CA in {directory / CA_FILE} "
                       f"(its issuer is {m.cert.issuer.rfc4514_string()})")
    check_validity(ca, f"TLS CA certificate {ca.subject.rfc4514_string()} in "
                       f"{directory / CA_FILE}", now)
    if address is not None and not names_address(m.cert, address):
        names = ", ".join(names_of(m.cert)) or "no subjectAltName"
        raise TlsError(f"{what} does not name {address}, the address the source dials "
                       f"(it names {names})")
    return m


def status(directory: Path, now: datetime.datetime | None = None) -> dict[str, Any]:
    """What a host's heartbeat says about its TLS material: whether each role has its
    files, when the earliest certificate expires, and what is wrong, if anything."""
    now = now or datetime.datetime.now(datetime.UTC)
    out: dict[str, Any] = {"server": False, "client": False, "expires": None, "problems": []}
    earliest: datetime.datetime | None = None
    for role in Role:
        if not any((directory / name).exists() for name in role.files()[1:]):
            continue
        try:
            m = check(directory, role, now=now)
        except TlsError as exc:
            out["problems"].append(exc.message)
            continue
        out[role.value] = True
        for cert in (m.cert, *m.cas):
            if earliest is None or cert.not_valid_after_utc < earliest:
                earliest = cert.not_valid_after_utc
    if earliest is not None:
        out["expires"] = earliest.isoformat()
    return out


class TlsStatus:
    """What the heartbeat says about the host's migration TLS material ,
    read again only when a file in the directory changes."""

    def __init__(self, directory: Path, required: bool) -> None:
        self.directory, self.required = directory, required
        self._seen: tuple[tuple[str, float, int], ...] | None = None
        self._status: dict[str, Any] = {}

    def _stamp(self) -> tuple[tuple[str, float, int], ...]:
        stamp = []
        for name in (CA_FILE, *(n for r in Role for n in r.files()[1:])):
            try:
                st = (self.directory / name).stat()
            except OSError:
                continue
            stamp.append((name, st.st_mtime, st.st_size))
        return tuple(stamp)

    def get(self) -> dict[str, Any]:
        stamp = self._stamp()
        if stamp != self._seen:
            self._seen, self._status = stamp, status(self.directory)
        return {**self._status, "required": self.required}
