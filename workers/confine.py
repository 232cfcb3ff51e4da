"""QEMU confined as libvirt confines it: an unprivileged user, a seccomp sandbox, and
only the files it needs made readable to that user.

The worker stays root; QEMU runs as FERRY_QEMU_USER/FERRY_QEMU_GROUP (plus the
group of /dev/kvm) with `-sandbox on,obsolete=deny,elevateprivileges=deny,
spawn=deny,resourcecontrol=deny`.  What it must open that its user cannot:

- monitor socket, save/restore/dump images: already file descriptors;
- serial files: opened by the worker, passed with -add-fd;
- disk images: chowned to the QEMU user while the guest runs and given back
  after (libvirt's DAC driver; an fdset would keep the source's image lock
  alive across a migration on shared storage), the original owner remembered
  in `trusted.ferry.*` xattrs with a reference count (dac.py);
- TLS files: a private copy for the moment QEMU reads them (`private_copy`), in
  the system's temp dir (the state dir is root's alone);
- taps, unix channels: opened by the worker, passed as fds; UEFI NVRAM, OVMF
  code, direct-boot kernel and initrd: like disks (the read-only ones only when
  the user cannot read them already);
- a tunnel's parallel channel sockets: in a directory of the system's temp dir
  owned by the QEMU user (`socket_dir`).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from workers.errors import InvalidInputError


@dataclass(frozen=True)
class Confinement:
    """Who a confined QEMU runs as."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary: the group that may open /dev/kvm

    def owns(self, path: Path) -> bool:
        st = path.stat()
        return st.st_uid == self.uid


def resolve(user: str, group: str) -> Confinement | None:
    """The identity of FERRY_QEMU_USER/GROUP; None when QEMU runs as root (user empty
    or 'root').  An unknown user or group is a clear error at worker start."""
    if not user or user == "root":
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise InvalidInputError(f"FERRY_QEMU_USER: no user '{user}' on this host (make setup "
                                "creates ferry-qemu; empty runs QEMU as root)") from None
    try:
        gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    except KeyError:
        raise InvalidInputError(f"FERRY_QEMU_GROUP: no group '{group}' on this host") \
            from None
    groups: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        kvm_gid = os.stat("/dev/kvm").st_gid
        if kvm_gid not in (0, gid):
            groups.append(kvm_gid)
    return Confinement(user, pw.pw_uid, gid, tuple(groups))


@contextlib.contextmanager
def private_copy(conf: Confinement, source: Path, names: tuple[str, ...]) -> Iterator[Path]:
    """`names` of `source` copied into a new directory of the system's temp dir (0700,
    files 0400), owned by the QEMU user alone, for as long as the block runs; the host's
    own directory is never chowned.  A missing file is left out: QEMU then says which
    one it missed."""
    path = Path(tempfile.mkdtemp(prefix="ferry-pki-"))
    try:
        os.chown(path, conf.uid, conf.gid)
        for name in names:
            src = source / name
            if not src.is_file():
                continue
            dst = path / name
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
            with os.fdopen(fd, "wb") as out:
                out.write(src.read_bytes())
            os.chown(dst, conf.uid, conf.gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)



def owner(conf: Confinement | None) -> tuple[int, int] | None:
    """Whom files QEMU itself opens (not passed to it) must belong to: None for root."""
    return None if conf is None else (conf.uid, conf.gid)


def socket_dir(conf: Confinement | None, run: Path) -> Path:
    """Where a QEMU's migration sockets go (a tunnel's parallel channels): the worker's
    run dir for QEMU as root; for a confined QEMU, which cannot reach the run dir, a
    directory of the system's temp dir owned by its user (0700), one per run dir.  One
    found there that belongs to anyone else is refused, never used."""
    if conf is None:
        return run
    digest = hashlib.sha256(str(run).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"ferry-qemu-{digest}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, conf.uid):
        raise InvalidInputError(f"{path} is not a directory of root or {conf.user}: "
                                "refusing to put QEMU's sockets there")
    os.chown(path, conf.uid, conf.gid, follow_symlinks=False)
    os.chmod(path, 0o700, follow_symlinks=False)
    return path


def reachable_nvram_dir(conf: Confinement | None, state_dir: Path, nvram_dir: Path) -> None:
    """The host's default NVRAM dir (<state dir>/nvram) reachable by a confined QEMU, as
    libvirt's /var/lib/libvirt/qemu/nvram is.  A FERRY_NVRAM_DIR elsewhere is the
    operator's to place (refused at start otherwise)."""
    if nvram_dir.parent == state_dir:
        reachable_subdir(conf, state_dir, nvram_dir)


def reachable_subdir(conf: Confinement | None, state_dir: Path, sub: Path) -> None:
    """`sub` of the state dir (NVRAM, fleecing files) reachable by a confined QEMU: it
    and the state dir searchable by all (o+x, not listable; the state dir's own files
    stay in its 0700 subdirs, and a confined QEMU's files in `sub` are its user's)."""
    if conf is None:
        return
    sub.mkdir(mode=0o711, parents=True, exist_ok=True)
    for d in (state_dir, sub):
        mode = stat.S_IMODE(d.stat().st_mode)
        if not mode & 0o001:
            d.chmod(mode | 0o001)
