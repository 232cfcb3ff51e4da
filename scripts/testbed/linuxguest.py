"""A real Linux guest for tests and the demo: Debian's kernel and busybox in an initramfs.

The tiny guest of guestimage.py proves memory moves; this one proves a
real operating system keeps running: its network connections stay open and its
clock and counters only grow.  It is built from two Debian packages, at setup or
test time, without root (only the kernel file in /boot must be readable):

- `linux-image-amd64`: the kernel is booted directly (QEMU's -kernel, or
  `<os><kernel>` in the domain XML).  Where it has a PVH entry (Debian's has),
  the ELF kernel is unpacked from the bzImage once and booted through it: no
  real-mode setup and no decompressor, which halves the boot under TCG.  The
  virtio modules it needs (virtio_pci,
  virtio_net and what modules.dep says they depend on, decompressed when the
  distribution ships .ko.xz/.ko.gz/.ko.zst) go into the initramfs, unless
  modules.builtin says they are built in.
- `busybox-static`: the whole userland.

The initramfs is a gzipped newc cpio written here in Python.  Its /init mounts
proc, sys and dev, loads the modules, configures eth0 from the kernel command
line (`ferry.ip=10.0.2.15/24 ferry.gw=10.0.2.2`, or DHCP with udhcpc when
ferry.ip is absent or `dhcp`), starts a TCP echo service on port 7 (busybox nc,
a process per connection, so many and long-lived connections work) and busybox
httpd on port 80 (its page names the boot), then writes to ttyS0, every 100 ms::

    ferry-guest ready <boot-id> ip=<address|dhcp>      (once)
    ferry-tick <boot-id> <counter> <uptime-seconds>    (10 a second)

With `ferry.dirty=MiB` on the command line a writer keeps rewriting that much
random data in the guest's RAM (a tmpfs file), for migrations under load.

The boot id is the kernel's random per-boot UUID, so a rebooted guest cannot
pass for one that kept running: continuity is the same boot id and a growing
counter (`continuity_problem`).  Kernel messages are kept off the console once
/init runs, so they do not split tick lines.

The initramfs (~1.1 MiB) is cached under the user's cache dir, keyed by the
kernel release, the busybox version and a hash of the builder's source (this file
and the modules split off it: cpio.py, the newc writer and reader; kernel.py, the
kernel, its modules and unpacking; initramfs.py, busybox and /init), with the size
and mtime of every input, and the unpacked kernel (~63 MiB) by the kernel file, so
only the first build costs anything (~3 s, mostly unpacking the kernel); a
cached build takes ~15 ms.

Under TCG the first tick comes ~3-5 s after QEMU starts.  KVM is used where
`kvm_usable()`: not under PVM (KVM without hardware virtualisation), which runs
this kernel at emulation speed, minutes to boot.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import itertools
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from scripts.testbed import cpio as _cpio
from scripts.testbed import initramfs as _initramfs
from scripts.testbed import kernel as _kernel
from scripts.testbed.cpio import CPIO_TRAILER, CpioEntry, read_newc, write_newc
from scripts.testbed.initramfs import (
    BUSYBOX_PATHS,
    ECHO_PORT,
    HTTP_PORT,
    INIT_SCRIPT,
    TICK_INTERVAL_MS,
    UDHCPC_SCRIPT,
    busybox_applets,
    busybox_version,
    find_busybox,
    initramfs_entries,
    render_init,
)
from scripts.testbed.kernel import (
    BOOT_DIR,
    MODULES_ROOT,
    PT_INTERP,
    PT_NOTE,
    XEN_ELFNOTE_PHYS32_ENTRY,
    LinuxGuestError,
    check_kernel_readable,
    elf_segments,
    extract_vmlinux,
    find_kernel,
    has_pvh_entry,
    module_load_order,
    module_name,
    parse_modules_dep,
    read_module,
)

# The public API, including what the split-off modules define (cpio.py, kernel.py,
# initramfs.py): importers keep importing it all from here.
__all__ = [
    "BOOT_DIR",
    "BUSYBOX_PATHS",
    "CACHE_FORMAT",
    "CACHE_KEEP_DAYS",
    "CPIO_TRAILER",
    "DEFAULT_MAC",
    "DEFAULT_MEMORY_MIB",
    "ECHO_PORT",
    "HTTP_PORT",
    "INIT_SCRIPT",
    "MODULES_ROOT",
    "PT_INTERP",
    "PT_NOTE",
    "TICK_INTERVAL_MS",
    "UDHCPC_SCRIPT",
    "USER_NET_GW",
    "USER_NET_IP",
    "WANTED_MODULES",
    "XEN_ELFNOTE_PHYS32_ENTRY",
    "CpioEntry",
    "LinuxGuest",
    "LinuxGuestError",
    "Tick",
    "build_guest",
    "busybox_applets",
    "busybox_version",
    "check_kernel_readable",
    "continuity_problem",
    "copied_to",
    "default_cache_dir",
    "default_domain_type",
    "domain_xml",
    "elf_segments",
    "extract_vmlinux",
    "find_busybox",
    "find_kernel",
    "has_pvh_entry",
    "initramfs_entries",
    "kernel_cmdline",
    "kvm_usable",
    "main",
    "module_load_order",
    "module_name",
    "parse_modules_dep",
    "parse_ready",
    "parse_ticks",
    "qemu_argv",
    "read_module",
    "read_newc",
    "read_serial",
    "render_init",
    "user_net_cmdline",
    "write_newc",
]  # fmt: skip

# Every module whose source goes into the initramfs or decides what does: the
# cache key hashes them all, so changing any of them rebuilds.
BUILDER_SOURCES = tuple(
    Path(f) for f in (__file__, _cpio.__file__, _kernel.__file__, _initramfs.__file__)
)

# virtio_pci finds the device, virtio_net drives it; modules.dep brings the rest.
WANTED_MODULES = ("virtio_pci", "virtio_net")
# QEMU user networking's fixed addresses.
USER_NET_IP = "10.0.2.15/24"
USER_NET_GW = "10.0.2.2"
DEFAULT_MAC = "52:54:00:12:34:56"
DEFAULT_MEMORY_MIB = 128
CACHE_FORMAT = 1  # bump to orphan every cached initramfs

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_TICK_RE = re.compile(rf"^ferry-tick ({_UUID}) (\d+) (\d+\.\d+)\r*\n", re.MULTILINE)
_READY_RE = re.compile(rf"^ferry-guest ready ({_UUID}) ip=(\S+)\r*\n", re.MULTILINE)
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class LinuxGuest:
    """A built guest: boot `kernel` with `initrd` (see `kernel_cmdline`).

    `kernel` is the uncompressed ELF kernel in the cache when the distribution's
    kernel has a PVH entry (QEMU boots it in a fraction of the time), else the
    /boot/vmlinuz file itself; `boot_kernel` is that /boot file either way.
    """

    kernel: Path
    initrd: Path
    release: str
    busybox_version: str
    modules: tuple[str, ...]  # module names in the initramfs, in load order
    boot_kernel: Path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ferry" / "linuxguest"


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _builder_hash() -> str:
    """A hash of the builder's source: this file and the modules split off it."""
    h = hashlib.sha256()
    for path in BUILDER_SOURCES:
        source = path.read_bytes()
        h.update(f"{path.name} {len(source)}\n".encode() + source)
    return h.hexdigest()


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join([f"format {CACHE_FORMAT}", *parts]).encode()).hexdigest()[:16]


def build_guest(
    cache_dir: Path | None = None,
    *,
    kernel: Path | None = None,
    modules_root: Path = MODULES_ROOT,
    busybox: Path | None = None,
) -> LinuxGuest:
    """The guest for the newest installed kernel (or `kernel`, /boot/vmlinuz-<release>).

    The initramfs is built once per kernel release, busybox version and version of
    this builder, and the ELF kernel once per kernel file; both are then found in
    `cache_dir` (default: ~/.cache/ferry/linuxguest).  Cached files unused for
    CACHE_KEEP_DAYS are removed.
    """
    if kernel is None:
        kernel, release = find_kernel(modules_root=modules_root)
    else:
        release = kernel.name.removeprefix("vmlinuz-")
    check_kernel_readable(kernel)
    moddir = modules_root / release
    try:
        deps = parse_modules_dep((moddir / "modules.dep").read_text())
        builtin_file = moddir / "modules.builtin"
        builtin = builtin_file.read_text().split() if builtin_file.exists() else []
    except OSError as exc:
        raise LinuxGuestError(f"modules of kernel {release} unreadable: {exc}") from None
    order = module_load_order(deps, WANTED_MODULES, builtin)
    bb = busybox or find_busybox()
    bb_version = busybox_version(bb)
    builder = _builder_hash()

    if cache_dir is not None:
        cache = Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
    else:
        cache = default_cache_dir()
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:  # no writable home: a per-user dir in the temp dir will do
            cache = Path(tempfile.gettempdir()) / f"ferry-linuxguest-{os.getuid()}"
            cache.mkdir(mode=0o700, exist_ok=True)
    initrd_key = _key(release, bb_version, builder, _stat_key(bb),
                      *(_stat_key(moddir / p) for p in order))
    initrd = cache / f"initrd-{release}-{initrd_key}.cpio.gz"
    if not initrd.is_file():
        modules = [(f"{module_name(p)}.ko", read_module(moddir / p)) for p in order]
        entries = initramfs_entries(bb.read_bytes(), busybox_applets(bb), modules)
        _write_atomic(initrd, gzip.compress(write_newc(entries), compresslevel=9, mtime=0))
    used = [initrd]

    # Not keyed by the builder: a 60 MiB file should not multiply as this file changes.
    elf_path = cache / f"vmlinux-{release}-{_key(release, _stat_key(kernel), 'pvh')}.elf"
    boot = kernel
    if elf_path.is_file():
        boot = elf_path
    else:
        elf = extract_vmlinux(kernel.read_bytes())
        if elf is not None and has_pvh_entry(elf):
            _write_atomic(elf_path, elf)
            boot = elf_path
    used.append(boot)
    _prune(cache, used)
    names = tuple(module_name(p) for p in order)
    return LinuxGuest(boot, initrd, release, bb_version, names, kernel)


def copied_to(guest: LinuxGuest, directory: Path) -> LinuxGuest:
    """`guest` with its kernel and initrd copied into `directory` (readable by all): a
    QEMU confined to its own user (FERRY_QEMU_USER) cannot read the cache in root's
    home, and ferry refuses a guest whose kernel its QEMU user cannot reach."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for path in (guest.kernel, guest.initrd):
        dst = directory / path.name
        shutil.copyfile(path, dst)
        dst.chmod(0o644)
        out.append(dst)
    return dataclasses.replace(guest, kernel=out[0], initrd=out[1])


CACHE_KEEP_DAYS = 7


def _prune(cache: Path, used: Sequence[Path]) -> None:
    """Mark `used` as used now and remove cached files nobody used for CACHE_KEEP_DAYS."""
    for path in used:
        if path.parent == cache:
            with contextlib.suppress(OSError):
                os.utime(path)
    cutoff = time.time() - CACHE_KEEP_DAYS * 86400
    for path in [*cache.glob("initrd-*.cpio.gz"), *cache.glob("vmlinux-*.elf")]:
        with contextlib.suppress(OSError):
            if path not in used and path.stat().st_mtime < cutoff:
                path.unlink()


def _write_atomic(out: Path, data: bytes) -> None:
    # Parallel test workers may build at once: each renames a complete file into place.
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- booting it ---------------------------------------------------------------------------


def kernel_cmdline(ip: str | None = None, gw: str | None = None, extra: Sequence[str] = (),
                   dirty_mib: int | None = None) -> str:
    """The guest's command line: a static `ip` ("10.0.2.15/24") and `gw`, or DHCP;
    `dirty_mib` starts a writer that keeps rewriting that much of the guest's RAM.

    panic=-1 reboots at once on a panic (QEMU's -no-reboot then exits), so a broken
    guest ends instead of hanging.
    """
    words = ["console=ttyS0", "quiet", "panic=-1"]
    if ip is not None:
        if not re.fullmatch(r"[0-9.]+/\d{1,2}|dhcp", ip):
            raise ValueError(f"ip must be ADDRESS/PREFIX or 'dhcp', got {ip!r}")
        words.append(f"ferry.ip={ip}")
    if gw is not None:
        if not re.fullmatch(r"[0-9.]+", gw):
            raise ValueError(f"gw must be an IPv4 address, got {gw!r}")
        words.append(f"ferry.gw={gw}")
    if dirty_mib is not None:
        words.append(f"ferry.dirty={int(dirty_mib)}")
    return " ".join([*words, *extra])


def user_net_cmdline() -> str:
    """Static addressing for QEMU user networking (no DHCP round trip at boot)."""
    return kernel_cmdline(USER_NET_IP, USER_NET_GW)


def kvm_usable() -> bool:
    """Whether KVM can run this guest at speed: /dev/kvm usable and not PVM.

    PVM (the kvm_pvm module, KVM without hardware virtualisation) runs only
    PVM-aware guest kernels natively and emulates anything else: the Debian
    kernel takes minutes to boot there, so TCG is faster.
    """
    return os.access("/dev/kvm", os.R_OK | os.W_OK) and not Path("/sys/module/kvm_pvm").exists()


def default_domain_type() -> str:
    """libvirt's domain type to run the guest with here: kvm, or qemu (TCG)."""
    return "kvm" if kvm_usable() else "qemu"


def _check_mac(mac: str) -> str:
    if not _MAC_RE.match(mac):
        raise ValueError(f"mac must be six lowercase hex pairs, got {mac!r}")
    return mac


def qemu_argv(
    guest: LinuxGuest,
    serial_log: Path,
    *,
    forwards: Mapping[int, int] | None = None,
    mac: str = DEFAULT_MAC,
    memory_mib: int = DEFAULT_MEMORY_MIB,
    vcpus: int = 1,
    cmdline: str | None = None,
    accel: str | None = None,
    qemu: str = "qemu-system-x86_64",
) -> list[str]:
    """QEMU's argv booting the guest directly, with a virtio NIC on user networking.

    `forwards` maps a host port on 127.0.0.1 to a guest port (e.g. {free: ECHO_PORT}).
    The serial console is appended to `serial_log`.  accel defaults to kvm:tcg where
    `kvm_usable()`, else tcg.
    """
    if accel is None:
        accel = "kvm:tcg" if kvm_usable() else "tcg"
    netdev = "user,id=n0" + "".join(
        f",hostfwd=tcp:127.0.0.1:{host}-:{port}" for host, port in (forwards or {}).items()
    )
    return [
        qemu,
        "-machine", f"pc,accel={accel}",
        "-m", str(memory_mib),
        "-smp", str(vcpus),
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-kernel", str(guest.kernel),
        "-initrd", str(guest.initrd),
        "-append", cmdline if cmdline is not None else user_net_cmdline(),
        "-chardev", f"file,id=s0,path={serial_log},append=on",
        "-device", "isa-serial,chardev=s0",
        "-netdev", netdev,
        "-device", f"virtio-net-pci,netdev=n0,mac={_check_mac(mac)}",
    ]  # fmt: skip


def _attr(value: object) -> str:
    return escape(str(value), {"'": "&apos;", '"': "&quot;"})


def domain_xml(
    name: str,
    guest: LinuxGuest,
    serial_log: Path,
    *,
    mac: str = DEFAULT_MAC,
    memory_mib: int = DEFAULT_MEMORY_MIB,
    vcpus: int = 1,
    uuid: str | None = None,
    cmdline: str | None = None,
    bridge: str | None = None,
    forwards: Mapping[int, int] | None = None,
    domain_type: str | None = None,
) -> str:
    """libvirt domain XML booting the guest directly, with a virtio NIC.

    The NIC is on `bridge` (<interface type='bridge'>, then `cmdline` should give the
    address, or DHCP is used), else on user networking; `forwards` (host port on
    127.0.0.1 -> guest port) is written as libvirt's <portForward> ranges (ferry maps
    them to QEMU's hostfwd).  ferry runs this definition as it is (define, start,
    migrate): tests/e2e/test_guest_network.py.
    """
    domain_type = domain_type or default_domain_type()
    if bridge is not None:
        nic = f"<interface type='bridge'>\n      <source bridge='{_attr(bridge)}'/>"
        if cmdline is None:
            cmdline = kernel_cmdline()
    else:
        nic = "<interface type='user'>"
        if cmdline is None:
            cmdline = user_net_cmdline()
    ports = "".join(
        f"\n      <portForward proto='tcp' address='127.0.0.1'>"
        f"<range start='{int(host)}' to='{int(port)}'/></portForward>"
        for host, port in (forwards or {}).items()
    )
    return f"""<domain type='{_attr(domain_type)}'>
  <name>{escape(name)}</name>
  <uuid>{_attr(uuid or uuidlib.uuid4())}</uuid>
  <memory unit='MiB'>{int(memory_mib)}</memory>
  <currentMemory unit='MiB'>{int(memory_mib)}</currentMemory>
  <vcpu>{int(vcpus)}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(guest.kernel))}</kernel>
    <initrd>{escape(str(guest.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {nic}
      <mac address='{_check_mac(mac)}'/>
      <model type='virtio'/>{ports}
    </interface>
    <serial type='file'>
      <source path='{_attr(serial_log)}' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


# -- reading the serial console -----------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """One `ferry-tick` line: which boot, the counter, seconds since that boot."""

    boot_id: str
    counter: int
    uptime_s: float


def parse_ticks(text: str) -> list[Tick]:
    """Ticks in the serial output, in order; only complete lines count (a trailing
    "ferry-tick <id> 12" may still become 123)."""
    return [Tick(m.group(1), int(m.group(2)), float(m.group(3))) for m in _TICK_RE.finditer(text)]


def parse_ready(text: str) -> list[tuple[str, str]]:
    """(boot id, ip setting) of every "ferry-guest ready" line: one per boot."""
    return [(m.group(1), m.group(2)) for m in _READY_RE.finditer(text)]


def read_serial(path: Path) -> str:
    """The serial log so far ("" before QEMU created it)."""
    # Bytes, not read_text(): universal newlines would turn the guest's \r\n into \n.
    try:
        return path.read_bytes().decode("ascii", errors="replace")
    except FileNotFoundError:
        return ""


def continuity_problem(ticks: Sequence[Tick]) -> str | None:
    """None when `ticks` are one boot that kept running, else one line saying why not.

    One boot: one boot id throughout; kept running: the counter and the uptime only
    grow.  A reboot (a new boot id, the counter from 1) or a guest put back in time
    is caught; lost lines (a gap in the counter) are not a discontinuity.
    """
    if not ticks:
        return "no ticks"
    first = ticks[0]
    for prev, tick in itertools.pairwise(ticks):
        if tick.boot_id != first.boot_id:
            return (f"boot id changed from {first.boot_id} to {tick.boot_id} "
                    f"at counter {tick.counter}: the guest rebooted")
        if tick.counter <= prev.counter:
            return f"counter went from {prev.counter} to {tick.counter}"
        if tick.uptime_s < prev.uptime_s:
            return f"uptime went back from {prev.uptime_s} to {tick.uptime_s} at {tick.counter}"
    return None


# -- CLI ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build (or find cached) the guest; print its parts and a QEMU command to boot it."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.testbed.linuxguest",
        description="Build ferry's Linux test guest from the installed Debian kernel and "
        "busybox-static.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="where initramfs files go")
    parser.add_argument("--kernel", type=Path, default=None, help="a /boot/vmlinuz-<release>")
    args = parser.parse_args(argv)
    try:
        guest = build_guest(args.cache_dir, kernel=args.kernel)
    except (LinuxGuestError, OSError) as exc:
        print(f"linuxguest: {exc}", file=sys.stderr)
        return 1
    print(f"kernel   {guest.kernel} ({guest.release}, from {guest.boot_kernel})")
    print(f"initrd   {guest.initrd} ({guest.initrd.stat().st_size} bytes)")
    print(f"busybox  {guest.busybox_version}")
    print(f"modules  {' '.join(guest.modules) or '(all built in)'}")
    argv_ = qemu_argv(guest, Path("serial.log"), forwards={7007: ECHO_PORT})
    print(f"boot     {shlex.join(argv_)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
