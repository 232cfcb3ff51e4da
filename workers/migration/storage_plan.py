"""Storage copy policy, pure: which disks are copied, what the dest creates, how far the
mirrors are.  The I/O is storage.py (source) and storage_dest.py (dest).

Choices (libvirt's where it has one):

- Disks copied: the ``migrate_disks`` targets, or every disk that is writable, not
  shareable and has a source (qemuMigrationAnyCopyDisk).  A listed disk that is
  read-only, empty or shareable is refused by name (libvirt would let the dest refuse
  read-only and empty ones; shareable ones it would copy, which a second writer makes
  meaningless).
- Begin's cookie names each disk with its virtual size (libvirt's ``capacity``) and
  ferry's extras: format, qcow2 cluster size, and for ``inc`` the backing file the
  top image names, so the dest can create the same image.
- The dest creates a missing image with ``qemu-img create``: same format and virtual
  size, qcow2 with the same cluster size; for ``inc`` the top over the same backing
  file name, which must already exist there.  A full copy gets a flat image (the
  mirror copies the whole chain into it).  An image that already exists is used as
  it is, and must be at least as large.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workers.domain import Disk, DomainDef
from workers.errors import InvalidInputError, MigrationError, UnsupportedError
from workers.migration.cookie import CookieNbd, CookieNbdDisk


def copyable_problem(disk: Disk) -> str | None:
    """Why `disk` cannot be copied, or None."""
    if disk.source is None:
        return "empty"
    if disk.readonly:
        return "read-only"
    if disk.shareable:
        return "shareable (shared with other guests: it is not copied)"
    return None


def disks_to_copy(d: DomainDef, migrate_disks: Sequence[str]) -> list[Disk]:
    """The disks a storage copy moves, in definition order."""
    by_target = {disk.target: disk for disk in d.disks}
    for target in migrate_disks:
        if target not in by_target:
            raise InvalidInputError(f"disk target {target} not found")
        problem = copyable_problem(by_target[target])
        if problem is not None:
            raise InvalidInputError(f"disk {target} cannot be copied: it is {problem}")
    if migrate_disks:
        return [disk for disk in d.disks if disk.target in migrate_disks]
    return [disk for disk in d.disks if copyable_problem(disk) is None]


def block_entry(query_block: Iterable[Mapping[str, Any]], disk: Disk) -> Mapping[str, Any]:
    """The query-block entry of `disk` (by its -drive id), with an image inserted."""
    for entry in query_block:
        if entry.get("device") == disk.drive_id and isinstance(entry.get("inserted"), Mapping):
            return entry
    raise MigrationError(f"disk {disk.target} has no image open in QEMU ({disk.drive_id})")


def _chain(image: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out = []
    node: Any = image
    while isinstance(node, Mapping):
        out.append(node)
        node = node.get("backing-image")
    return out


def nbd_disk(disk: Disk, entry: Mapping[str, Any], inc: bool) -> CookieNbdDisk:
    """Begin's cookie line for `disk` from its query-block entry (QEMU's view of the image,
    no file locks involved)."""
    image = entry["inserted"].get("image") or {}
    chain = _chain(image)
    fmt = str(image.get("format") or disk.format)
    if fmt not in ("raw", "qcow2"):
        raise UnsupportedError(f"disk {disk.target} is {fmt}: only raw and qcow2 are copied")
    copied = chain[:1] if inc else chain
    allocation = sum(int(layer.get("actual-size") or 0) for layer in copied)
    cluster = image.get("cluster-size") if fmt == "qcow2" else None
    backing = backing_fmt = None
    if inc and len(chain) > 1:
        backing = image.get("backing-filename") or image.get("full-backing-filename")
        backing_fmt = image.get("backing-filename-format") or chain[1].get("format")
    return CookieNbdDisk(disk.target, int(image.get("virtual-size") or 0), format=fmt,
                         cluster_size=int(cluster) if cluster else None,
                         backing_file=str(backing) if backing else None,
                         backing_format=str(backing_fmt) if backing else None,
                         allocation=allocation)


@dataclass(frozen=True)
class DestDisk:
    """A disk the dest receives: its definition here and what the source said of it."""

    disk: Disk
    wanted: CookieNbdDisk

    @property
    def path(self) -> str:
        assert self.disk.source is not None
        return self.disk.source

    @property
    def export(self) -> str:
        """libvirt's export name: the -drive id."""
        return self.disk.drive_id


def dest_disks(d: DomainDef, nbd: CookieNbd) -> list[DestDisk]:
    """Match the source's <nbd> disks with this definition (libvirt's Prepare checks)."""
    by_target = {disk.target: disk for disk in d.disks}
    out = []
    for wanted in nbd.disks:
        disk = by_target.get(wanted.target)
        if disk is None:
            raise InvalidInputError(f"unable to find disk target '{wanted.target}' for "
                                    "non-shared-storage migration")
        if disk.source is None or disk.readonly:
            raise InvalidInputError(f"cannot migrate empty or read-only disk {disk.target}")
        if wanted.format is not None and wanted.format != disk.format:
            raise InvalidInputError(f"disk {disk.target} is {wanted.format} on the source "
                                    f"but {disk.format} in the dest's definition")
        out.append(DestDisk(disk, wanted))
    return out


def backing_path(image: str, backing: str) -> str:
    """Where a backing file named `backing` in `image` is (relative: to the image's dir)."""
    return backing if os.path.isabs(backing) else os.path.join(os.path.dirname(image), backing)


def create_argv(dd: DestDisk) -> list[str]:
    """qemu-img create for a missing image (never -u: a missing backing is an error)."""
    w = dd.wanted
    opts = []
    if dd.disk.format == "qcow2":
        if w.cluster_size:
            opts.append(f"cluster_size={w.cluster_size}")
        if w.backing_file:
            opts += [f"backing_file={_opt(w.backing_file)}",
                     f"backing_fmt={w.backing_format or 'raw'}"]
    argv = ["qemu-img", "create", "-q", "-f", dd.disk.format]
    if opts:
        argv += ["-o", ",".join(opts)]
    return [*argv, dd.path, str(w.capacity)]


def _opt(value: str) -> str:
    return value.replace(",", ",,")


def needs_backing(dd: DestDisk) -> str | None:
    """The backing file an inc copy needs on this host (resolved), or None."""
    w = dd.wanted
    if not w.backing_file or dd.disk.format != "qcow2":
        return None
    return backing_path(dd.path, w.backing_file)


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


# -- the mirrors' progress ------------------------------------------------------------------


@dataclass
class MirrorState:
    """One mirror job as the source knows it from query-block-jobs and events."""

    target: str  # the disk's target dev
    job: str  # the block job id (libvirt's: the -drive id)
    node: str  # the nbd node it writes to
    length: int = 0
    offset: int = 0
    ready: bool = False
    ended: bool = False  # COMPLETED or CANCELLED seen
    cancelled: bool = False
    error: str | None = None
    done_len: int = 0  # earlier jobs' (backup rounds before the mirror)
    done_offset: int = 0

    def next_job(self) -> None:
        """The job ended well: count it, and watch the next one on the same id."""
        self.done_len, self.done_offset = self.done_len + self.length, \
            self.done_offset + self.offset
        self.length = self.offset = 0
        self.ready = self.ended = self.cancelled = False


def node_name(disk: Disk) -> str:
    """libvirt's name of the nbd node a mirror writes to."""
    return f"migration-{disk.target}-storage"


def update_from_query(mirrors: Iterable[MirrorState],
                      jobs: Iterable[Mapping[str, Any]]) -> None:
    """Fold a query-block-jobs reply in (a job that ended is no longer listed)."""
    by_id = {str(j.get("device")): j for j in jobs}
    for m in mirrors:
        j = by_id.get(m.job)
        if j is None or m.ended:
            continue
        m.length, m.offset = int(j.get("len") or 0), int(j.get("offset") or 0)
        m.ready = m.ready or bool(j.get("ready"))


def update_from_event(mirrors: Iterable[MirrorState], event: str,
                      data: Mapping[str, Any]) -> MirrorState | None:
    """Fold a BLOCK_JOB_* event in; the mirror it was about, if ours."""
    m = next((m for m in mirrors if m.job == data.get("device")), None)
    if m is None:
        return None
    if "len" in data:
        m.length, m.offset = int(data.get("len") or 0), int(data.get("offset") or 0)
    if event == "BLOCK_JOB_READY":
        m.ready = True
    elif event in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
        m.ended, m.cancelled = True, event == "BLOCK_JOB_CANCELLED"
        if data.get("error"):
            m.error = str(data["error"])
    elif event == "BLOCK_JOB_ERROR" and m.error is None:
        m.error = f"{data.get('operation', 'I/O')} error"
    return m


def figures(mirrors: Sequence[MirrorState]) -> dict[str, int]:
    """libvirt's disk_* figures (qemuMigrationSrcFetchMirrorStats: Σlen, Σoffset)."""
    total = sum(m.done_len + m.length for m in mirrors)
    done = sum(m.done_offset + m.offset for m in mirrors)
    return {"disk_total": total, "disk_processed": done, "disk_remaining": max(total - done, 0)}


@dataclass
class RateMeter:
    """Bytes per second of a growing counter, over the last few samples (ferry's own
    disk_bps: libvirt leaves it 0 for NBD)."""

    window_s: float = 2.0
    samples: list[tuple[float, int]] | None = None

    def update(self, value: int, now: float) -> int:
        samples = self.samples = [*(self.samples or []), (now, value)]
        while len(samples) > 2 and now - samples[0][0] > self.window_s:
            samples.pop(0)
        (t0, v0) = samples[0]
        return int((value - v0) / (now - t0)) if now > t0 and value >= v0 else 0


def failure(mirrors: Iterable[MirrorState]) -> str | None:
    """The first mirror failure as an operator line, or None."""
    for m in mirrors:
        if m.error is not None:
            hint = " (the connection to the dest's NBD server broke?)" \
                if m.error == "Input/output error" else ""
            return f"the copy of disk {m.target} to the dest failed: {m.error}{hint}"
        if m.cancelled:
            return f"the copy of disk {m.target} was cancelled"
    return None


def check_dest_answer(copying: Sequence[Disk], nbd: CookieNbd | None) -> int:
    """The dest's NBD port from Prepare's cookie, which must name exactly our disks."""
    if nbd is None:
        raise MigrationError("the dest's cookie has no NBD section: it cannot receive the "
                             "disks (a ferry without storage copy?)")
    ours = {d.target for d in copying}
    theirs = {d.target for d in nbd.disks}
    if theirs - ours:
        raise InvalidInputError(f"the dest's cookie names disk(s) this guest does not copy: "
                                f"{', '.join(sorted(theirs - ours))}")
    if ours - theirs:
        raise MigrationError(f"the dest exported no NBD target for disk(s) "
                             f"{', '.join(sorted(ours - theirs))}")
    if copying and not nbd.port:
        raise MigrationError("the dest's cookie has no NBD port")
    return nbd.port
