"""What this host can do, asked of the kernel (cheap, no I/O beyond a syscall)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
from collections.abc import Iterable
from pathlib import Path

from workers.domain import DomainDef
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


def cpu_signature(hidden: Iterable[str] = (), cpuinfo: str | None = None) -> str:
    """This host's CPU as a host-passthrough guest sees it: vendor, family/model/stepping
    and a digest of its flags (less the ones FERRY_CPU_HIDE_FEATURES hides)."""
    text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    hide = {h.replace("_", "-").replace(".", "-") for h in hidden}
    flags = sorted(f for f in fields.get("flags", "").split()
                   if f.replace("_", "-").replace(".", "-") not in hide)
    digest = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]
    return (f"{fields.get('vendor_id', '?')} {fields.get('cpu family', '?')}/"
            f"{fields.get('model', '?')}/{fields.get('stepping', '?')} flags {digest}")


def sees_host_cpu(d: DomainDef) -> bool:
    """Whether the guest sees the host's own CPU (host-* modes under KVM)."""
    return d.cpu_mode in ("host-passthrough", "host-model") and d.type == "kvm"


def check_same_cpu(d: DomainDef, source: str | None, here: str, unsafe: bool) -> None:
    """libvirt's rule: a guest that sees its host's CPU moves only to an identical CPU,
    unless the caller says --unsafe."""
    if not sees_host_cpu(d) or source is None or source == here or unsafe:
        return
    raise UnsupportedError(f"cpu mode '{d.cpu_mode}': this host's CPU ({here}) differs from "
                           f"the source's ({source}), so the guest would see its CPU change "
                           "under it (--unsafe to migrate anyway)")
