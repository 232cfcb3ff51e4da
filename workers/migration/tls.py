"""Native TLS for migration streams: QEMU's tls-creds-x509 objects, the host's policy,
and QEMU's TLS failures told in ferry's words.

Each end gets its own object for one migration (libvirt's scheme): the dest's
incoming QEMU a `server` object with verify-peer on (only a source showing a
client certificate from a CA the dest trusts gets in), the source a `client`
object and `tls-hostname` = the address it dials, which the dest's certificate
must name.  QEMU reads the files when the object is added, so a certificate
replaced on disk is used by the next migration; the object goes, and the
migration parameters are reset, when the migration ends.

The storage copy (NBD) uses the same object: `add_creds` is idempotent within
a migration and returns the id passed as `tls-creds` to nbd-server-start
(dest, storage_dest.start_nbd) and to the nbd blockdev-add (source,
storage.StorageCopy, with `tls-hostname` = the URI's host).  `remove_creds`
runs when the migration ends, after the NBD server and the mirrors' nodes.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from workers import confine, pki
from workers.agent import HostAgent
from workers.domobj import DomainObj
from workers.errors import QemuError, TlsError
from workers.migration.chain_state import MigrationState
from workers.migration.params import MigrationFlags, MigrationParams, parse_qemu_uri
from workers.monitor import Monitor
from workers.pki import Role

log = logging.getLogger(__name__)

CREDS_ID = "objferry_migrate_tls0"  # one migration per QEMU at a time: one fixed id
#: migration parameters of a stream without TLS (also what every migration ends with)
PLAIN = {"tls-creds": "", "tls-hostname": ""}


def require_policy(agent: HostAgent, p: MigrationParams) -> None:
    """A host with FERRY_MIGRATION_TLS=required refuses a migration in or out without
    --tls (an offline migration moves no stream: nothing to encrypt)."""
    if agent.settings.migration_tls != "required" or p.has(MigrationFlags.OFFLINE):
        return
    if not p.has(MigrationFlags.TLS):
        raise TlsError(f"host {agent.host} requires TLS for every migration "
                       "(FERRY_MIGRATION_TLS=required): migrate with --tls")


def check_material(agent: HostAgent, p: MigrationParams, role: Role,
                   address: str | None = None) -> None:
    """The policy, then (for a TLS migration) this host's files for `role`, before any
    QEMU sees them: one line saying which file and what is wrong."""
    require_policy(agent, p)
    if p.has(MigrationFlags.TLS) and not p.has(MigrationFlags.OFFLINE):
        pki.check(agent.settings.pki_dir, role, address)


def dial_host(uri: str) -> str:
    """The host part of a tcp: migration URI: what the dest's certificate must name."""
    scheme, host, _ = parse_qemu_uri(uri)
    if scheme != "tcp":
        raise TlsError(f"TLS needs a tcp: migration URI, not {uri}")
    return host


@contextlib.contextmanager
def _readable_dir(agent: HostAgent, role: Role) -> Iterator[Path]:
    """The directory QEMU reads `role`'s files from: the host's own, or, for a confined
    QEMU, a copy only its user can read, gone again once QEMU has read it."""
    source = agent.settings.pki_dir
    if agent.confinement is None:
        yield source
        return
    with confine.private_copy(agent.confinement, source, role.files()) as copy:
        yield copy


async def _drop_object(mon: Monitor) -> None:
    """A creds object a crashed Perform left behind (QEMUs outlive migrations)."""
    with contextlib.suppress(QemuError):
        await mon.execute("object-del", {"id": CREDS_ID})


async def add_creds(agent: HostAgent, dom: DomainObj, role: Role) -> str:
    """Give dom's QEMU this host's TLS credentials for `role`; their object id."""
    if dom.tls_creds is not None:
        return dom.tls_creds
    mon = dom.require_monitor("set up migration TLS")
    await _drop_object(mon)
    args: dict[str, Any] = {"qom-type": "tls-creds-x509", "id": CREDS_ID,
                            "endpoint": role.value, "verify-peer": True}
    if agent.settings.migration_tls_priority:
        args["priority"] = agent.settings.migration_tls_priority
    with _readable_dir(agent, role) as directory:
        try:
            await mon.execute("object-add", {**args, "dir": str(directory)})
        except QemuError as exc:
            text = exc.message.split(": ", 1)[-1]
            raise TlsError(f"QEMU refused this host's TLS {role.value} credentials "
                           f"({agent.settings.pki_dir}): {text}") from None
    dom.tls_creds = CREDS_ID
    return CREDS_ID


async def remove_creds(dom: DomainObj, *, stale: bool = False) -> None:
    """Best effort, when a migration ends: parameters back to plain, the object gone.
    `stale`: also when this worker did not add it (a Perform resumed after a restart)."""
    creds, dom.tls_creds = dom.tls_creds, None
    creds = creds or (CREDS_ID if stale else None)
    if creds is None or dom.monitor is None:
        return
    try:
        await dom.monitor.execute("migrate-set-parameters", PLAIN, timeout=10)
        await dom.monitor.execute("object-del", {"id": creds}, timeout=10)
    except QemuError as exc:
        log.warning("domain %s: removing the migration TLS object failed: %s", dom.name, exc)


#: TLS 1.3: the client's handshake is over before the dest checks its certificate, so
#: the dest's refusal shows as the channel failing under the first write or read
_DEST_CLOSED = re.compile(r"Cannot (write to|read from) TLS channel")
_PEER_FAILURES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"known issuer|not trusted|signer", re.I),
     "the TLS certificate of dest host {dest} is not signed by a CA this host trusts "
     "({ca})"),
    (re.compile(r"does not match the hostname", re.I),
     "the TLS certificate of dest host {dest} does not name {name}, the address this host "
     "dials"),
    (re.compile(r"expired", re.I), "the TLS certificate of dest host {dest} has expired"),
    (re.compile(r"not (yet )?activated|not yet valid", re.I),
     "the TLS certificate of dest host {dest} is not valid yet"),
)


def stream_failure(p: MigrationParams, uri: str, desc: str | None,
                   ca_file: Path) -> TlsError | None:
    """QEMU's error-desc of a failed TLS stream, in ferry's words; None: not a TLS matter.

    QEMU gives no error-desc at all when the dest refuses the source's client
    certificate (it just closes the connection), so a missing one is that case.
    """
    dest = p.dest
    if not desc:  # TLS 1.2: the dest's refusal of the client certificate, no words
        return TlsError(f"dest host {dest} closed the TLS connection during the handshake: "
                        f"it refused this host's client certificate (not from a CA {dest} "
                        "trusts?)")
    for pattern, text in _PEER_FAILURES:
        if pattern.search(desc):
            return TlsError(text.format(dest=dest, name=dial_host(uri), ca=ca_file),
                            cause=desc)
    if _DEST_CLOSED.search(desc):
        return TlsError(f"dest host {dest} ended the TLS session at its start: it refused "
                        f"this host's client certificate, or its QEMU failed ({desc})")
    if re.search(r"TLS|handshake|pull function|non-properly terminated", desc):
        return TlsError(f"TLS handshake with dest host {dest} failed: {desc}")
    return None


_SOURCE_KNEW = "the TLS certificate of dest host"  # the source's own verdict on the dest
_DEST_VERDICTS = re.compile(r"^[^:\n]*qemu[^:\n]*: (.*(?:[Cc]ertificate|TLS|Verify).*)$",
                            re.MULTILINE)


def dest_verdict(agent: HostAgent, dom: DomainObj, st: MigrationState) -> MigrationState:
    """On the dest, when a TLS stream failed in Perform and the source could not tell
    why: what the incoming QEMU logged about the handshake (e.g. "Verify failed: No
    certificate was found."), which the source cannot see, replaces its account."""
    err = st.error
    if not st.params.has(MigrationFlags.TLS) or err is None or \
            not str(err.get("phase", "")).startswith("perform") or \
            str(err.get("text", "")).startswith(_SOURCE_KNEW):
        return st
    log_text = log_since(agent.store.qemu_log(dom.name), dom.log_offset)
    refined = verdict(agent.host, st.params.source, log_text)
    if refined is None:
        return st
    refined.at(phase=err.get("phase"), host=err.get("host"))
    return replace(st, error=refined.to_dict())


def verdict(dest: str, source: str, log_text: str) -> TlsError | None:
    """The dest QEMU's last word on a TLS handshake, from its log, as an error."""
    seen = _DEST_VERDICTS.findall(log_text)
    if not seen:
        return None
    reason = seen[-1].strip()
    if "Verify failed" in reason or "certificate" in reason.lower():
        return TlsError(f"dest host {dest} refused the client certificate of {source} "
                        f"(missing, or not signed by a CA {dest} trusts): {reason}",
                        cause=reason)
    return TlsError(f"TLS handshake with dest host {dest} failed there: {reason}",
                    cause=reason)


def log_since(path: Path, offset: int, limit: int = 64 << 10) -> str:
    """What a QEMU log gained since `offset` (its size when that QEMU started)."""
    try:
        with path.open("rb") as f:
            f.seek(max(offset, path.stat().st_size - limit))
            return f.read(limit).decode(errors="replace")
    except OSError:
        return ""
