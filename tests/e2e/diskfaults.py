"""Real disk faults for end-to-end tests (no failpoint): an image another process locks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path

F_OFD_SETLK = 37  # linux/fcntl.h: open file description locks, the kind QEMU takes
QEMU_WRITE_UNSHARED = 201  # QEMU's file-posix.c: RAW_LOCK_SHARED_BASE + BLK_PERM_WRITE's bit


@contextlib.contextmanager
def disk_locked(path: Path) -> Iterator[None]:
    """Hold the lock byte by which a process tells QEMU it will not share writing: a QEMU
    that wants to write the image (start, `cont` after an incoming migration) fails with
    'Failed to get "write" lock', as it would beside another VM using the disk."""
    fd = os.open(path, os.O_RDWR)
    try:
        flock = struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, QEMU_WRITE_UNSHARED, 1, 0)
        fcntl.fcntl(fd, F_OFD_SETLK, flock)
        yield
    finally:
        os.close(fd)  # closing the description drops its locks
