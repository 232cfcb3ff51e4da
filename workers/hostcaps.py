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


UNPRIVILEGED_UFFD = "/proc/sys/vm/unprivileged_userfaultfd"


def userfaultfd_for_qemu(confined: bool) -> bool:
    """Whether QEMU may open a userfaultfd: as root, if the kernel has it; as an
    unprivileged user (QEMU 7.2 knows neither /dev/userfaultfd nor user-mode-only
    faults), only with the sysctl vm.unprivileged_userfaultfd = 1."""
    if not confined:
        return userfaultfd_available()
    try:
        with open(UNPRIVILEGED_UFFD) as f:
            allowed = f.read().strip() == "1"
    except OSError:
        allowed = False
    return allowed and userfaultfd_available()


def require_postcopy(confined: bool = False) -> None:
    if userfaultfd_for_qemu(confined):
        return
    if confined and userfaultfd_available():
        raise UnsupportedError("post-copy migration needs userfaultfd, which this host's "
                               "kernel allows a confined QEMU only with the sysctl "
                               "vm.unprivileged_userfaultfd=1 (or FERRY_QEMU_USER=root)")
    raise UnsupportedError("post-copy migration needs userfaultfd, which this host's "
                           "kernel does not allow")
