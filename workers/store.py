"""A host's state on disk: persistent definitions and per-domain status files.

Layout under the state dir (libvirt's, flattened):
    qemu/<name>.xml        persistent definitions
    run/<name>.xml         status of a running domain: <domstatus> wrapping the live <domain>
    run/<name>.pid, run/<name>.log, run/<uuid>.qmp
    host-uuid, worker.log
Every write goes to a temporary file that is renamed into place, so a crash
never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

log = logging.getLogger(__name__)

_PARSER = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_blank_text=True
)


def atomic_write(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Replace `path` atomically; `durable` also survives a power loss (fsync)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@dataclass(frozen=True)
class StatusRecord:
    """What a status file says about a domain that was running."""

    name: str
    state: str
    reason: str
    pid: int
    domain_xml: str
    extra: dict[str, str]


class StateStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.defs = root / "qemu"
        self.run = root / "run"
        for d in (self.root, self.defs, self.run):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    # paths
    def pidfile(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def qemu_log(self, name: str) -> Path:
        return self.run / f"{name}.log"

    def qmp_socket(self, uuid: str) -> Path:
        return self.run / f"{uuid}.qmp"

    def status_path(self, name: str) -> Path:
        return self.run / f"{name}.xml"

    # host identity
    def host_uuid(self, wanted: str) -> str:
        """The host UUID: `wanted` if given (and stored), else the stored one, else a new one."""
        path = self.root / "host-uuid"
        if wanted:
            atomic_write(path, wanted.encode(), 0o644)
            return wanted
        with contextlib.suppress(FileNotFoundError, ValueError):
            return str(uuidlib.UUID(path.read_text().strip()))
        new = str(uuidlib.uuid4())
        atomic_write(path, new.encode(), 0o644)
        return new

    # persistent definitions
    def save_definition(self, name: str, xml: str) -> None:
        atomic_write(self.defs / f"{name}.xml", xml.encode())

    def delete_definition(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.defs / f"{name}.xml").unlink()

    def load_definitions(self) -> list[tuple[str, str]]:
        return [(p.stem, p.read_text()) for p in sorted(self.defs.glob("*.xml"))]

    # status files
    def save_status(
        self,
        name: str,
        *,
        state: str,
        reason: str,
        pid: int,
        domain_xml: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        root = etree.Element("domstatus", state=state, reason=reason, pid=str(pid))
        for key, value in (extra or {}).items():
            etree.SubElement(root, key).text = value
        root.append(etree.fromstring(domain_xml.encode(), _PARSER))
        # Not fsynced: a status file describes a QEMU process, which a power loss ends
        # too; a worker that dies finds the renamed file in the page cache.  It is
        # written several times per migration (each ~2 ms more with fsync).
        atomic_write(self.status_path(name), etree.tostring(root, pretty_print=True),
                     durable=False)

    def delete_status(self, name: str) -> None:
        for path in (self.status_path(name), self.pidfile(name)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def forget_runtime(self, name: str, uuid: str) -> None:
        """A guest's QEMU is gone: its status, pid file and monitor socket go too (QEMU
        leaves its socket behind when it dies)."""
        self.delete_status(name)
        with contextlib.suppress(FileNotFoundError):
            self.qmp_socket(uuid).unlink()

    def load_statuses(self) -> list[StatusRecord]:
        records = []
        for path in sorted(self.run.glob("*.xml")):
            try:
                root = etree.parse(str(path), _PARSER).getroot()
                dom = root.find("domain")
                if dom is None:
                    raise ValueError("no <domain> in status file")
                extra = {c.tag: c.text or "" for c in root if c.tag != "domain"}
                records.append(
                    StatusRecord(
                        name=path.stem,
                        state=root.get("state", "nostate"),
                        reason=root.get("reason", "unknown"),
                        pid=int(root.get("pid", "0")),
                        domain_xml=etree.tostring(dom).decode(),
                        extra=extra,
                    )
                )
            except (etree.XMLSyntaxError, ValueError, OSError) as exc:
                log.error("ignoring unreadable status file %s: %s", path, exc)
        return records
