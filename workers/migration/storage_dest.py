"""Storage copy on the dest: the images, QEMU's NBD server and its exports.

Prepare creates the missing images (storage_plan.py says how) before QEMU
starts, then starts QEMU's NBD server on this host's migration address with
a port of its range and exports each copied disk writable, as libvirt's
qemuMigrationDstStartNBDServer does.  Finish stops the server before the
CPUs start.  A failed migration removes the images Prepare created; an image
that was there before is never removed.  A UEFI guest's NVRAM missing here is
made from its template like an image and removed the same way: QEMU writes the
source's variable store into it, which comes with the RAM (guestfiles.py).

Which images a Prepare created is kept in a ledger on this host's disk
(`<state dir>/storage/<hash of the job id>.json`), never taken from a task
message: it survives a worker restart and the incoming QEMU's death, so Finish
(cancelled) and the sweeper can remove them whatever happened in between.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.agent import HostAgent
from workers.domain import DomainDef
from workers.domobj import DomainObj
from workers.errors import FerryError, InvalidInputError, MigrationError, QemuError
from workers.guestfiles import make_nvram, missing_nvram, with_nvram_path
from workers.lifecycle import inactive_domain_for, nvram_dir
from workers.migration import storage_keep
from workers.migration.cookie import CookieNbd, CookieNbdDisk
from workers.migration.params import MigrationParams
from workers.migration.storage_plan import (
    DestDisk,
    create_argv,
    dest_disks,
    gib,
    needs_backing,
)
from workers.monitor import Monitor
from workers.ports import bindable
from workers.store import atomic_write

log = logging.getLogger(__name__)

QEMU_IMG_TIMEOUT_S = 60
PORT_TRIES = 5
EXPORT_PREFIX = "ferry-nbd-"


@dataclass
class IncomingStorage:
    """What Prepare set up for the disks of one incoming migration."""

    disks: list[DestDisk]
    created: list[str] = field(default_factory=list)  # removed if the migration fails
    port: int = 0
    resumed: dict[str, str] = field(default_factory=dict)  # target -> attempt continued

    def cookie(self) -> CookieNbd:
        """Prepare's answer: the port and the dest's disks (libvirt's form), and which
        interrupted copies the dest continues (ferry's `resume`)."""
        return CookieNbd(self.port, tuple(
            CookieNbdDisk(dd.disk.target, dd.wanted.capacity,
                          resume=self.resumed.get(dd.disk.target)) for dd in self.disks))

    def attempts(self, job_id: str) -> dict[str, tuple[str, int]]:
        """Image -> (the copy attempt whose data it holds, virtual size), for a retry:
        the disks the source copies with a dirty bitmap (it says `resume` in Begin)."""
        return {dd.path: (self.resumed.get(dd.disk.target, job_id), dd.wanted.capacity)
                for dd in self.disks if dd.wanted.resume is not None}


async def _qemu_img(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), QEMU_IMG_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise QemuError(f"{argv[0]} {argv[1]} did not finish in {QEMU_IMG_TIMEOUT_S}s") \
            from None
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else "no output"


async def _check_existing(agent: HostAgent, dd: DestDisk) -> None:
    """An image already here is used as it is: it must be free, of the format the
    definition says and at least as large as the source's."""
    rc, out, err = await _qemu_img("qemu-img", "info", "--output=json", "-f",
                                   dd.disk.format, dd.path)
    if rc != 0:
        if "lock" in err:
            raise MigrationError(f"image {dd.path} of disk {dd.disk.target} is in use by "
                                 f"another process on host {agent.host} (a storage copy "
                                 "needs the dest's own copy of the disk)")
        raise InvalidInputError(f"image {dd.path} of disk {dd.disk.target} on host "
                                f"{agent.host} cannot be read: {_first_line(err)}")
    size = int(json.loads(out).get("virtual-size") or 0)
    if size < dd.wanted.capacity:
        raise InvalidInputError(f"image {dd.path} of disk {dd.disk.target} on host "
                                f"{agent.host} is {size} bytes, smaller than the source's "
                                f"{dd.wanted.capacity}")


def _check_room(agent: HostAgent, missing: Sequence[DestDisk]) -> None:
    """Enough free space for the images to create, per file system."""
    needs: dict[int, tuple[int, int, list[DestDisk]]] = {}
    for dd in missing:
        folder = os.path.dirname(dd.path)
        try:
            st = os.statvfs(folder)
            dev = os.stat(folder).st_dev
        except OSError as exc:
            raise InvalidInputError(f"directory {folder} of disk {dd.disk.target} is not "
                                    f"usable on host {agent.host}: {exc.strerror}") from None
        want, free, group = needs.get(dev, (0, st.f_bavail * st.f_frsize, []))
        needs[dev] = (want + (dd.wanted.allocation or 0), free, [*group, dd])
    for want, free, group in needs.values():
        if want > free:
            names = ", ".join(f"{dd.disk.target} ({dd.path})" for dd in group)
            raise MigrationError(f"no room on host {agent.host} for disk(s) {names}: the "
                                 f"copy needs {gib(want)}, {gib(free)} free")


class Ledger:
    """The images each incoming job created on this host, one small JSON file per job."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "storage"

    def _path(self, job_id: str) -> Path:
        return self.dir / f"{hashlib.sha256(job_id.encode()).hexdigest()[:32]}.json"

    def add(self, job_id: str, domain: str, image: str) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        entry = self.get(job_id) or {"job": job_id, "domain": domain, "since": time.time(),
                                     "images": []}
        entry["images"] = [*entry["images"], image]
        atomic_write(self._path(job_id), json.dumps(entry).encode())

    def get(self, job_id: str) -> dict[str, Any] | None:
        try:
            entry = json.loads(self._path(job_id).read_text())
        except (OSError, ValueError):
            return None
        return dict(entry) if isinstance(entry, dict) and entry.get("job") == job_id else None

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(entry, dict) and isinstance(entry.get("job"), str):
                out.append(entry)
        return out

    def discard(self, job_id: str) -> list[str]:
        """The migration failed: remove the images the job created; which they were."""
        entry = self.get(job_id)
        if entry is None:
            return []
        images = [str(i) for i in entry.get("images", [])]
        remove_created(images)
        self.forget(job_id)
        return images

    def forget(self, job_id: str) -> None:
        """The migration completed: its images are the guest's disks now."""
        try:
            self._path(job_id).unlink()
        except FileNotFoundError:
            return


async def check_images(agent: HostAgent, d: DomainDef, nbd: CookieNbd | None,
                       p: MigrationParams) -> tuple[list[DestDisk], list[DestDisk]]:
    """Prepare's checks (a dry run's too): every disk the source sends, and those to
    create; the first problem is an error."""
    if nbd is None:
        raise MigrationError("storage copy asked for, but the source's cookie has no NBD "
                             "section")
    disks = dest_disks(d, nbd)
    missing = []
    for dd in disks:
        agent.allowed.check(dd.path, f"disk {dd.disk.target}")
        if os.path.lexists(dd.path):
            await _check_existing(agent, dd)
            continue
        backing = needs_backing(dd) if p.storage_inc else None
        if backing is not None and not os.path.exists(backing):
            raise InvalidInputError(f"backing file {backing} of disk {dd.disk.target} does "
                                    f"not exist on host {agent.host} (--copy-storage-inc "
                                    "copies only the top image)")
        missing.append(dd)
    _check_room(agent, missing)
    return disks, missing


async def prepare_images(agent: HostAgent, d: DomainDef, nbd: CookieNbd | None,
                         p: MigrationParams) -> IncomingStorage:
    """Check the disks the source sends and create the missing images (nothing is
    created unless every check passes); a partial image kept from an interrupted copy
    the source continues is used, and is this job's to remove."""
    ledger = Ledger(agent.store.root)
    resumed = storage_keep.claim(agent, d, nbd, p.source) \
        if agent.settings.storage_retry_keep_s else {}
    try:
        by_target = {disk.target: disk for disk in d.disks}
        for target in resumed:
            assert by_target[target].source is not None
            ledger.add(p.job_id, d.name, str(by_target[target].source))
        disks, missing = await check_images(agent, d, nbd, p)
        storage = IncomingStorage(disks, resumed=resumed)
        storage.created += [dd.path for dd in disks if dd.disk.target in resumed]
        for dd in missing:
            await _create(agent, dd, storage, ledger, p.job_id, d.name)
        _create_nvram(agent, d, storage, ledger, p.job_id)
    except BaseException:
        ledger.discard(p.job_id)
        raise
    return storage


async def dry_run(agent: HostAgent, d: DomainDef, nbd: CookieNbd,
                  p: MigrationParams) -> dict[str, Any]:
    """What Prepare would do with these disks, every check made, nothing created or
    started: per disk the image used or created, and the NBD port it would take."""
    inactive_domain_for(agent, d, "migrate in")  # no other guest of its name or uuid here
    disks, missing = await check_images(agent, d, nbd, p)
    address = agent.settings.migration_address
    if p.disks_port is not None:
        if not bindable(address, p.disks_port):
            raise MigrationError(f"the NBD port {p.disks_port} on {address} is in use on "
                                 f"host {agent.host}")
        port: int | str = p.disks_port
    else:
        free = agent.migration_ports.peek(address)
        if free is None:
            raise MigrationError(f"no free migration port on {address} on host {agent.host}")
        port = f"one of {agent.migration_ports.low}-{agent.migration_ports.high}"
    rows = [{"target": dd.disk.target, "path": dd.path, "format": dd.disk.format,
             "capacity": dd.wanted.capacity, "copy_bytes": dd.wanted.allocation,
             "image": "create" if dd in missing else "use existing",
             "backing": needs_backing(dd) if p.storage_inc else None} for dd in disks]
    made = _nvram_to_make(agent, d)
    nvram = made.firmware.nvram if made is not None and made.firmware is not None else None
    return {"host": agent.host, "nbd": f"{address}:{port}" if disks else None,
            "disks": rows, "copy_bytes": sum(dd.wanted.allocation or 0 for dd in disks),
            "nvram": None if nvram is None else {"path": nvram, "file": "create"}}


async def _create(agent: HostAgent, dd: DestDisk, storage: IncomingStorage, ledger: Ledger,
                  job_id: str, domain: str) -> None:
    argv = create_argv(dd)
    rc, _, err = await _qemu_img(*argv)
    if os.path.exists(dd.path):  # even half-made: it goes if anything fails
        storage.created.append(dd.path)
        ledger.add(job_id, domain, dd.path)
    if rc != 0:
        raise MigrationError(f"cannot create image {dd.path} of disk {dd.disk.target} on "
                             f"host {agent.host}: {_first_line(err)}")
    log.info("created %s for disk %s (%s, %d bytes)", dd.path, dd.disk.target,
             dd.disk.format, dd.wanted.capacity)


def _nvram_to_make(agent: HostAgent, d: DomainDef) -> DomainDef | None:
    """`d` with its NVRAM path filled in, when no file is there yet (in an allowed dir)."""
    filled = with_nvram_path(d, nvram_dir(agent))
    path = missing_nvram(filled)
    if path is None:
        return None
    agent.allowed.check(str(path), "os nvram")
    return filled


def _create_nvram(agent: HostAgent, d: DomainDef, storage: IncomingStorage, ledger: Ledger,
                  job_id: str) -> None:
    """The guest's NVRAM is on the source's own storage too: its file here is made from
    the template, for QEMU to fill with what the flash held on the source."""
    filled = _nvram_to_make(agent, d)
    if filled is None:
        return
    path = str(make_nvram(filled, agent.host))
    storage.created.append(path)
    ledger.add(job_id, d.name, path)
    log.info("created NVRAM %s of '%s' from its template, for the migrated variables",
             path, d.name)


def remove_created(paths: Sequence[str]) -> None:
    """Remove images a Prepare created (best effort, logged)."""
    for path in paths:
        try:
            os.unlink(path)
            log.info("removed image %s created for a migration that failed", path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.error("could not remove image %s: %s", path, exc)


def discard_images(agent: HostAgent, job_id: str) -> None:
    """An incoming job failed (its QEMU is gone): the images made for it go."""
    Ledger(agent.store.root).discard(job_id)


async def ready_to_keep(agent: HostAgent, dom: DomainObj) -> bool:
    """A failed incoming storage copy whose partial images may be kept for a retry:
    the setting allows it, they hold data (the copy wrote to them, or they were kept
    before), and its QEMU flushed them (then it may be killed)."""
    if not agent.settings.storage_retry_keep_s or dom.storage_in is None or \
            not dom.active or dom.monitor is None or \
            not any(dd.wanted.resume for dd in dom.storage_in.disks):
        return False
    storage = dom.storage_in
    if not storage.resumed:  # a continued image holds an earlier try's data anyway
        drives = [dd.disk.drive_id for dd in storage.disks if dd.wanted.resume]
        if not await storage_keep.written(dom.monitor, drives):
            return False
    return await storage_keep.flushed(dom.monitor)


def keep_for_retry(agent: HostAgent, job_id: str, storage: IncomingStorage, uuid: str,
                   source: str) -> None:
    """The failed job's QEMU is gone after a flush: the images it created are kept for
    a retry instead of removed (storage_keep.py)."""
    ledger = Ledger(agent.store.root)
    entry = ledger.get(job_id)
    images = [str(i) for i in entry.get("images", [])] if entry else []
    attempts = storage.attempts(job_id)
    kept = storage_keep.keep(agent, {i: attempts[i] for i in images if i in attempts},
                             uuid, source)
    remove_created([i for i in images if i not in kept])
    ledger.forget(job_id)


def keep_images(agent: HostAgent, job_id: str) -> None:
    """An incoming job completed: its images are the guest's disks."""
    Ledger(agent.store.root).forget(job_id)


def sweep_images(agent: HostAgent, ended: Callable[[str], bool],
                 running: Callable[[str], bool]) -> list[str]:
    """Ledger entries of jobs that ended without Finish getting to them (a worker
    restart, a chain that broke): removed, unless their guest runs here (it arrived:
    the images are its disks).  What was done, one line each."""
    ledger = Ledger(agent.store.root)
    done = []
    for entry in ledger.entries():
        job = str(entry["job"])
        if not ended(job):
            continue
        if running(str(entry.get("domain", ""))):
            ledger.forget(job)
            continue
        if images := ledger.discard(job):
            done.append(f"removed image(s) {', '.join(images)} of incoming job {job}")
    return done


async def _node_names(mon: Monitor) -> dict[str, str]:
    """-drive id -> the node name of its format layer (block-export-add takes no id)."""
    out = {}
    for entry in await mon.execute("query-block"):
        inserted = entry.get("inserted") or {}
        if entry.get("device") and inserted.get("node-name"):
            out[str(entry["device"])] = str(inserted["node-name"])
    return out


async def start_nbd(agent: HostAgent, dom: DomainObj, mon: Monitor, storage: IncomingStorage,
                    p: MigrationParams, tls_creds: str | None = None) -> int:
    """The NBD server on the migration address and one writable export per disk; the
    port (p.disks_port, or one of this host's range)."""
    if not storage.disks:
        return 0  # nothing to copy: no server (libvirt starts it with the first disk)
    address = agent.settings.migration_address
    storage.port = await _server_start(agent, dom, mon, address, p.disks_port, tls_creds)
    nodes = await _node_names(mon)
    for dd in storage.disks:
        node = nodes.get(dd.disk.drive_id)
        if node is None:
            raise MigrationError(f"disk {dd.disk.target} has no block node in the incoming "
                                 "QEMU")
        await _export(agent, mon, dd, node)
    return storage.port


async def _export(agent: HostAgent, mon: Monitor, dd: DestDisk, node: str) -> None:
    try:
        await mon.execute("block-export-add", {
            "type": "nbd", "id": EXPORT_PREFIX + dd.disk.target, "node-name": node,
            "name": dd.export, "writable": True})
    except QemuError as exc:
        if "read-only" not in str(exc):
            raise
        # -drive falls back to read-only where another process holds the file's write
        # lock; a raw image passes `qemu-img info` in _check_existing all the same
        raise MigrationError(f"image {dd.path} of disk {dd.disk.target} is in use by "
                             f"another process on host {agent.host} (QEMU could open it "
                             "only read-only; a storage copy needs the dest's own copy of "
                             "the disk)") from exc


async def _server_start(agent: HostAgent, dom: DomainObj, mon: Monitor, address: str,
                        pinned: int | None, tls_creds: str | None) -> int:
    for _ in range(PORT_TRIES):
        port = pinned if pinned is not None else agent.migration_ports.acquire(address)
        if pinned is None:
            dom.ports.append(("migration", port))
        args: dict[str, Any] = {"addr": {"type": "inet",
                                         "data": {"host": address, "port": str(port)}}}
        if tls_creds:
            args["tls-creds"] = tls_creds
        try:
            await mon.execute("nbd-server-start", args)
            log.info("NBD server of %s on %s:%d", dom.name, address, port)
            return port
        except QemuError as exc:
            if "in use" not in str(exc):
                raise
            if pinned is not None:
                raise MigrationError(f"the NBD port {port} on {address} is in use on host "
                                     f"{agent.host}") from None
            log.info("NBD port %d taken meanwhile, trying another", port)
    raise MigrationError(f"no free NBD port on {address} after {PORT_TRIES} tries")


async def stop_nbd(dom: DomainObj) -> None:
    """Drop the NBD server (and its exports) before the CPUs start; a failure only logs,
    as in libvirt (the server may be gone with a restarted worker's knowledge of it)."""
    if dom.monitor is None:
        return
    try:
        await dom.monitor.execute("nbd-server-stop", timeout=10)
    except FerryError as exc:
        if "not running" not in str(exc):
            log.warning("domain %s: nbd-server-stop failed: %s", dom.name, exc)
