"""What this host can do, asked of the kernel (cheap, no I/O beyond a syscall)."""

from __future__ import annotations

import ctypes
import os
import platform

from workers.errors import UnsupportedError

_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}


def userfaultfd_available() -> bool:
    """Post-copy needs userfaultfd: try to open one (root, or unprivileged allowed)."""
    nr = _SYS_USERFAULTFD.get(platform.machine())
    if nr is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        return False
    os.close(fd)
    return True


def require_postcopy() -> None:
    if not userfaultfd_available():
        raise UnsupportedError("post-copy migration needs userfaultfd, which this host's "
                               "kernel does not allow")
