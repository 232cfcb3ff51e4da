"""A pure-Python newc ("070701") cpio writer and reader, for the Linux test guest's initramfs.

Split from scripts/testbed/linuxguest.py, which re-exports these names.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

CPIO_TRAILER = "TRAILER!!!"
_NEWC_MAGIC = b"070701"
_NEWC_HEADER = 110  # magic + 13 fields of 8 hex digits


@dataclass(frozen=True)
class CpioEntry:
    """One archive member: `mode` carries the file type bits (stat.S_IFREG | 0o644 ...).

    A symlink's `data` is its target; a device's numbers are `rdev` (major, minor).
    """

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return bytes(-n % 4)


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A newc ("070701") cpio archive of `entries`, as the kernel's initramfs unpacker reads it.

    Deterministic (inode numbers count up, owner root, mtime 0).  Names are relative
    paths; every parent directory must come earlier in the archive, because the
    kernel's unpacker does not make missing directories.
    """
    out = bytearray()
    seen: set[str] = set()
    dirs: set[str] = set()
    for ino, entry in enumerate(entries, start=1):
        _check_entry(entry, seen, dirs)
        seen.add(entry.name)
        if stat.S_ISDIR(entry.mode):
            dirs.add(entry.name)
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        out += _newc_member(ino, entry.mode, nlink, entry.name, entry.data, entry.rdev)
    out += _newc_member(0, 0, 1, CPIO_TRAILER, b"", (0, 0))
    return bytes(out)


def _check_entry(entry: CpioEntry, seen: set[str], dirs: set[str]) -> None:
    name = entry.name
    parts = name.split("/")
    if not name or name.startswith("/") or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"cpio member name must be a clean relative path, got {name!r}")
    if name == CPIO_TRAILER:
        raise ValueError(f"cpio member may not be named {CPIO_TRAILER!r}")
    if name in seen:
        raise ValueError(f"cpio member {name!r} appears twice")
    parent = name.rpartition("/")[0]
    if parent and parent not in dirs:
        raise ValueError(f"cpio member {name!r} comes before its directory {parent!r}")
    kind = stat.S_IFMT(entry.mode)
    if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK):
        raise ValueError(f"cpio member {name!r} has unsupported file type {kind:#o}")
    if kind in (stat.S_IFDIR, stat.S_IFCHR, stat.S_IFBLK) and entry.data:
        raise ValueError(f"cpio member {name!r} is not a file but has data")
    if kind == stat.S_IFLNK and not entry.data:
        raise ValueError(f"cpio symlink {name!r} has no target")


def _newc_member(
    ino: int, mode: int, nlink: int, name: str, data: bytes, rdev: tuple[int, int]
) -> bytes:
    encoded = name.encode() + b"\0"
    # ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    # rdevminor, namesize, check
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    if any(not 0 <= f <= 0xFFFF_FFFF for f in fields):
        raise ValueError(f"cpio member {name!r} does not fit newc's 32-bit fields")
    header = _NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    return header + encoded + _pad4(_NEWC_HEADER + len(encoded)) + data + _pad4(len(data))


def read_newc(archive: bytes) -> list[CpioEntry]:
    """The members of a newc archive up to its trailer (the inverse of `write_newc`)."""
    entries: list[CpioEntry] = []
    at = 0
    while True:
        if archive[at : at + 6] != _NEWC_MAGIC:
            raise ValueError(f"no newc header at offset {at}")
        if len(archive) < at + _NEWC_HEADER:
            raise ValueError(f"truncated header at offset {at}")
        try:
            fields = [int(archive[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise ValueError(f"malformed newc header at offset {at}") from None
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name_at = at + _NEWC_HEADER
        raw_name = archive[name_at : name_at + namesize]
        if namesize == 0 or len(raw_name) != namesize or raw_name[-1:] != b"\0":
            raise ValueError(f"truncated or unterminated name at offset {name_at}")
        name = raw_name[:-1].decode()
        data_at = name_at + namesize + (-(_NEWC_HEADER + namesize) % 4)
        data = archive[data_at : data_at + size]
        if len(data) != size:
            raise ValueError(f"member {name!r} is truncated")
        if name == CPIO_TRAILER:
            return entries
        entries.append(CpioEntry(name, mode, data, rdev))
        at = data_at + size + (-size % 4)
