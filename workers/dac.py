"""Disk images handed to the QEMU user and given back: libvirt's DAC "remember owner".

A confined QEMU opens its disks by path as its own user, so while the guest
runs each image belongs to that user; the original owner is remembered and
restored when the last guest using the image goes.  As libvirt
(src/security/security_util.c), the memory is on the file itself, in
extended attributes every host sharing the image sees: `trusted.ferry.dac`
("+UID:+GID", the owner to restore), `trusted.ferry.ref_dac` (how many QEMUs
use it) and `trusted.ferry.timestamp_dac` (the boot time they were written
at: attributes from before a reboot are stale, nobody uses the image any
more).  Two QEMUs on one image (the source and the dest of a migration on
shared storage) count two.  A source whose guest migrated away never
restores (the dest may run on another machine that shares the image and
keeps no count there).  Where the file system has no trusted xattrs, the
original owner is kept with the guest (in its status file) and restored when
its QEMU goes, unless another guest of this host uses the image.

Why not file descriptors: an fdset keeps the source's locked open file
description alive after its migration, and the dest then cannot take the
image's write lock until the source QEMU is gone (QEMU 7.2; tried).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from workers.confine import Confinement
from workers.domain import DomainDef
from workers.errors import InvalidInputError

log = logging.getLogger(__name__)

OWNER = "trusted.ferry.dac"
REFS = "trusted.ferry.ref_dac"
STAMP = "trusted.ferry.timestamp_dac"
_NO_XATTR = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)


@dataclass(frozen=True)
class Claim:
    """An image handed to the QEMU user, and how to give it back."""

    path: str
    uid: int  # the owner before the first claim
    gid: int
    counted: bool  # the xattrs count users; else this claim alone restores

    def to_json(self) -> list[object]:
        return [self.path, self.uid, self.gid, self.counted]

    @classmethod
    def from_json(cls, data: list[object]) -> Claim:
        path, uid, gid, counted = data
        return cls(str(path), int(str(uid)), int(str(gid)), bool(counted))


def boot_time() -> str:
    """The host's boot time (btime of /proc/stat), as libvirt stamps its xattrs."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return line.split()[1]
    return "0"


def _get(fd: int, name: str) -> str | None:
    try:
        return os.getxattr(fd, name).decode()
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def _drop(fd: int) -> None:
    for name in (OWNER, REFS, STAMP):
        with contextlib.suppress(OSError):
            os.removexattr(fd, name)


def _owner(text: str) -> tuple[int, int]:
    uid, _, gid = text.partition(":")
    return int(uid.lstrip("+")), int(gid.lstrip("+"))


@contextlib.contextmanager
def _locked(path: str) -> Iterator[int]:
    """The image open (never followed through a symlink swap) and flock'ed while its
    xattrs change: two workers of one machine may claim and release it at once
    (flock does not meet QEMU's own OFD byte-range locks)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def check_reachable(conf: Confinement, path: str, what: str) -> None:
    """Refuse, naming the directory, a file the QEMU user could not reach even once it
    owns it: every directory on the way must be searchable by that user."""
    target = Path(os.path.realpath(path))
    for directory in reversed(target.parents):
        try:
            st = directory.stat()
        except OSError as exc:
            raise InvalidInputError(f"{what} {path}: {directory}: {exc.strerror}") from None
        if not _may(conf, st, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            raise InvalidInputError(
                f"the QEMU user {conf.user} cannot reach {what} {path}: directory "
                f"{directory} is not searchable by it (give it o+x, or move the file)")


def _may(conf: Confinement, st: os.stat_result, user: int, group: int, other: int) -> bool:
    if st.st_uid == conf.uid:
        return bool(st.st_mode & user)
    if st.st_gid == conf.gid or st.st_gid in conf.groups:
        return bool(st.st_mode & group)
    return bool(st.st_mode & other)


def claim(conf: Confinement, path: str, what: str = "disk") -> Claim:
    """Hand `path` to the QEMU user, remembering its owner (or counting one more user)."""
    try:
        with _locked(path) as fd:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) and not stat.S_ISBLK(st.st_mode):
                raise InvalidInputError(f"{what} {path} is not a file or a block device")
            counted, uid, gid = _count_in(fd, st)
            os.fchown(fd, conf.uid, conf.gid)
    except OSError as exc:
        raise InvalidInputError(f"cannot hand {what} {path} to the QEMU user {conf.user}: "
                                f"{exc.strerror}") from None
    return Claim(path, uid, gid, counted)


def _count_in(fd: int, st: os.stat_result) -> tuple[bool, int, int]:
    """One more user in the xattrs: (counted, owner to restore)."""
    try:
        owner, refs, stamp = _get(fd, OWNER), _get(fd, REFS), _get(fd, STAMP)
        if owner is not None and stamp != boot_time():
            _drop(fd)  # written before a reboot: nobody uses the image any more
            owner = None
        if owner is None:
            os.setxattr(fd, OWNER, f"+{st.st_uid}:+{st.st_gid}".encode())
            os.setxattr(fd, STAMP, boot_time().encode())
            os.setxattr(fd, REFS, b"1")
            return True, st.st_uid, st.st_gid
        os.setxattr(fd, REFS, str(int(refs or "0") + 1).encode())
        uid, gid = _owner(owner)
        return True, uid, gid
    except OSError as exc:
        if exc.errno not in _NO_XATTR:
            raise
        return False, st.st_uid, st.st_gid


def release(c: Claim, *, restore: bool, in_use_here: bool = False) -> None:
    """One user fewer; the last one gives the image back to its owner (`restore`: not
    after the guest migrated away).  Uncounted claims restore unless `in_use_here`."""
    try:
        with _locked(c.path) as fd:
            if c.counted:
                _count_out(fd, c, restore)
            elif restore and not in_use_here:
                os.fchown(fd, c.uid, c.gid)
    except FileNotFoundError:
        return  # the image was removed meanwhile: nothing to give back
    except OSError as exc:
        log.warning("disk %s: giving it back to %d:%d failed: %s", c.path, c.uid, c.gid, exc)


def _count_out(fd: int, c: Claim, restore: bool) -> None:
    owner, refs = _get(fd, OWNER), _get(fd, REFS)
    if owner is None:
        return  # dropped as stale, or never ours
    left = int(refs or "1") - 1
    if left > 0:
        os.setxattr(fd, REFS, str(left).encode())
        return
    _drop(fd)
    if restore:
        uid, gid = _owner(owner)
        os.fchown(fd, uid, gid)


def guest_paths(d: DomainDef) -> list[tuple[str, str, bool]]:
    """Every file a QEMU for `d` opens by path, as (path, what, whether it writes it):
    disks (files and block devices), the UEFI code and NVRAM, a direct-boot kernel and
    initrd.  Sockets, serial files and taps are handed over as fds instead."""
    out = [(x.source, f"disk {x.target}", not x.readonly) for x in d.disks if x.source]
    fw = d.firmware
    if fw is not None:
        out.append((fw.loader, "os loader", False))
        if fw.nvram is not None:
            out.append((fw.nvram, "os nvram", True))
    out += [(p, what, False) for p, what in ((d.kernel, "os kernel"), (d.initrd, "os initrd"))
            if p is not None]
    return out


def readable(conf: Confinement, path: str) -> bool:
    """Whether the QEMU user may read `path` as it is (permission bits; no ACLs)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return _may(conf, st, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)


def claim_guest(conf: Confinement | None, d: DomainDef) -> list[Claim]:
    """The files a confined QEMU for `d` opens by path, handed to its user (none for QEMU
    as root): what it writes always, what it only reads when its user cannot read it
    already (a world-readable OVMF code or kernel stays as it is).  A file its user
    could not reach is refused, and nothing is left changed."""
    if conf is None:
        return []
    claims: list[Claim] = []
    try:
        for path, what, writes in guest_paths(d):
            check_reachable(conf, path, what)
            if writes or not readable(conf, path):
                claims.append(claim(conf, path, what))
    except BaseException:
        release_all(claims, restore=True)
        raise
    return claims


def release_all(claims: list[Claim], *, restore: bool) -> None:
    for c in claims:
        release(c, restore=restore)
