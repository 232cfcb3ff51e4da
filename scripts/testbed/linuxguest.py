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
kernel release, the busybox version and a hash of this file (with the size and
mtime of every input), and the unpacked kernel (~63 MiB) by the kernel file, so
only the first build costs anything (~3 s, mostly unpacking the kernel); a
cached build takes ~15 ms.

Under TCG the first tick comes ~3-5 s after QEMU starts.  KVM is used where
`kvm_usable()`: not under PVM (KVM without hardware virtualisation), which runs
this kernel at emulation speed, minutes to boot.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import itertools
import lzma
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

BOOT_DIR = Path("/boot")
MODULES_ROOT = Path("/lib/modules")
BUSYBOX_PATHS = (Path("/usr/bin/busybox"), Path("/bin/busybox"))
# virtio_pci finds the device, virtio_net drives it; modules.dep brings the rest.
WANTED_MODULES = ("virtio_pci", "virtio_net")
ECHO_PORT = 7
HTTP_PORT = 80
TICK_INTERVAL_MS = 100
# QEMU user networking's fixed addresses.
USER_NET_IP = "10.0.2.15/24"
USER_NET_GW = "10.0.2.2"
DEFAULT_MAC = "52:54:00:12:34:56"
DEFAULT_MEMORY_MIB = 128
CACHE_FORMAT = 1  # bump to orphan every cached initramfs

_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_TICK_RE = re.compile(rf"^ferry-tick ({_UUID}) (\d+) (\d+\.\d+)\r*\n", re.MULTILINE)
_READY_RE = re.compile(rf"^ferry-guest ready ({_UUID}) ip=(\S+)\r*\n", re.MULTILINE)
_BUSYBOX_VERSION_RE = re.compile(r"BusyBox v(\S+)(?: \(([^)]*)\))?")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class LinuxGuestError(RuntimeError):
    """A part of the guest is missing or unusable; the message is one line saying which."""


# -- newc cpio ----------------------------------------------------------------------------

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


# -- kernel and modules -------------------------------------------------------------------


def _version_key(release: str) -> list[tuple[int, str]]:
    # "6.1.0-57-amd64" sorts by its numbers: 6.1.0-57 before 6.1.0-101.
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", release) if p]


def find_kernel(boot_dir: Path = BOOT_DIR, modules_root: Path = MODULES_ROOT) -> tuple[Path, str]:
    """The newest /boot/vmlinuz-<release> that has /lib/modules/<release>, and its release."""
    found = sorted(
        (
            (p.name.removeprefix("vmlinuz-"), p)
            for p in boot_dir.glob("vmlinuz-*")
            if (modules_root / p.name.removeprefix("vmlinuz-") / "modules.dep").is_file()
        ),
        key=lambda rp: _version_key(rp[0]),
    )
    if not found:
        raise LinuxGuestError(
            f"no kernel: no {boot_dir}/vmlinuz-* with {modules_root}/<release>/modules.dep "
            "(install the Debian package linux-image-amd64)"
        )
    release, path = found[-1]
    return path, release


def check_kernel_readable(kernel: Path) -> None:
    """Say in one line when the kernel file cannot be read (Ubuntu installs it mode 0600)."""
    try:
        with open(kernel, "rb") as f:
            f.read(1)
    except PermissionError:
        raise LinuxGuestError(
            f"kernel {kernel} is not readable by uid {os.getuid()}: "
            f"run `sudo chmod 0644 {kernel}` (or build as root)"
        ) from None
    except OSError as exc:
        raise LinuxGuestError(f"kernel {kernel} cannot be read: {exc.strerror}") from None


def module_name(path: str) -> str:
    """The module name of a modules.dep path: kernel/drivers/net/virtio_net.ko.xz -> virtio_net."""
    base = path.rpartition("/")[2]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep as {module path: [paths it depends on]}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep and path.strip():
            deps[path.strip()] = rest.split()
    return deps


def module_load_order(
    deps: Mapping[str, Sequence[str]], wanted: Iterable[str], builtin: Iterable[str] = ()
) -> list[str]:
    """Paths of the modules to insmod, each after everything it depends on.

    `builtin` holds names (or modules.builtin paths) of modules built into the kernel:
    a wanted module built in needs nothing.
    """
    by_name = {module_name(p): p for p in deps}
    built_in = {module_name(b) for b in builtin}
    order: list[str] = []
    done: set[str] = set()

    def visit(path: str, chain: tuple[str, ...]) -> None:
        if path in done:
            return
        if path in chain:
            raise LinuxGuestError(f"modules.dep has a cycle through {module_name(path)}")
        for dep in deps.get(path, ()):
            visit(dep, (*chain, path))
        done.add(path)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in built_in:
            continue
        if key not in by_name:
            raise LinuxGuestError(
                f"kernel has no module {name} (neither built in nor in modules.dep)"
            )
        visit(by_name[key], ())
    return order


PT_INTERP = 3
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU boots an ELF kernel through


def elf_segments(elf: bytes) -> list[tuple[int, int, int]]:
    """(type, file offset, file size) of each program header of a 64-bit little-endian ELF."""
    if elf[:4] != b"\x7fELF" or elf[4:6] != b"\x02\x01":
        raise LinuxGuestError("not a 64-bit little-endian ELF file")
    try:
        (phoff,) = struct.unpack_from("<Q", elf, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
        return [
            (p_type, p_offset, p_filesz)
            for p_type, _flags, p_offset, _vaddr, _paddr, p_filesz in (
                struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize) for i in range(phnum)
            )
        ]
    except struct.error:
        raise LinuxGuestError("truncated ELF program headers") from None


def has_pvh_entry(elf: bytes) -> bool:
    """Whether an ELF kernel carries Xen's PVH entry note, which QEMU's -kernel boots."""
    for p_type, offset, size in elf_segments(elf):
        if p_type != PT_NOTE:
            continue
        at, end = offset, min(offset + size, len(elf))
        while at + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, at)
            name = elf[at + 12 : at + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            at += 12 + namesz + (-namesz % 4) + descsz + (-descsz % 4)
    return False


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage (xz or gzip payload), else None.

    Booting it through its PVH entry skips the real-mode setup and the
    decompressor, which take seconds under TCG.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:  # payload_offset/length came with boot protocol 2.08
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            # The kernel appends the size after the gzip member: a decompressobj stops there.
            elf = zlib.decompressobj(wbits=31).decompress(payload)
        else:
            return None
    except (lzma.LZMAError, zlib.error):
        return None
    return elf if elf.startswith(b"\x7fELF") else None


def read_module(path: Path) -> bytes:
    """A module file's ELF bytes, decompressed if the distribution ships it compressed."""
    raw = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if name.endswith(".ko.gz"):
        return gzip.decompress(raw)
    if name.endswith(".ko.zst"):
        # Python 3.11 has no zstd; the zstd tool is one of ferry's Debian packages.
        tool = shutil.which("zstd")
        if tool is None:
            raise LinuxGuestError(f"module {path} is zstd-compressed and no zstd tool is installed")
        res = subprocess.run([tool, "-dcq", "--", str(path)], capture_output=True, check=False)
        if res.returncode != 0:
            why = res.stderr.decode(errors="replace").strip()
            raise LinuxGuestError(f"zstd could not decompress {path}: {why}")
        return res.stdout
    return raw


# -- busybox ------------------------------------------------------------------------------


def find_busybox() -> Path:
    """The busybox-static binary (a dynamic busybox cannot run alone in an initramfs)."""
    for path in BUSYBOX_PATHS:
        if path.is_file() and os.access(path, os.X_OK):
            if any(p_type == PT_INTERP for p_type, _, _ in elf_segments(path.read_bytes())):
                raise LinuxGuestError(
                    f"{path} is dynamically linked: install the Debian package busybox-static"
                )
            return path
    raise LinuxGuestError("no busybox: install the Debian package busybox-static")


def _busybox_output(busybox: Path, *args: str) -> str:
    res = subprocess.run([str(busybox), *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise LinuxGuestError(f"{busybox} {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout


def busybox_version(busybox: Path) -> str:
    """E.g. "1.35.0 (Debian 1:1.35.0-4+deb12u1+b1)"."""
    m = _BUSYBOX_VERSION_RE.search(_busybox_output(busybox))
    if m is None:
        raise LinuxGuestError(f"{busybox} does not say its version")
    return m.group(1) + (f" ({m.group(2)})" if m.group(2) else "")


def busybox_applets(busybox: Path) -> list[str]:
    """Install paths of busybox's applets ("bin/sh", "usr/bin/nc", ...)."""
    return [line.strip() for line in _busybox_output(busybox, "--list-full").splitlines()
            if line.strip()]


# -- the initramfs ------------------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/sh
# PID 1 of ferry's Linux test guest (written by scripts/testbed/linuxguest.py).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Kernel messages stay off the console from here: they would split tick lines.
dmesg -n 1
exec 3>/dev/ttyS0
say() { echo "ferry-guest $*" >&3; }

while read -r m; do
    insmod "/lib/modules/$m" || say "error insmod $m failed"
done < /etc/ferry/modules

ip=dhcp
gw=
dirty=
for w in $(cat /proc/cmdline); do
    case "$w" in
        ferry.ip=*) ip="${w#ferry.ip=}" ;;
        ferry.gw=*) gw="${w#ferry.gw=}" ;;
        ferry.dirty=*) dirty="${w#ferry.dirty=}" ;;
    esac
done

ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ "$n" -lt 100 ]; do
    usleep 50000
    n=$((n + 1))
done
[ -e /sys/class/net/eth0 ] || say "error no eth0"
ip link set eth0 up
if [ "$ip" = dhcp ]; then
    udhcpc -i eth0 -s /etc/ferry/udhcpc.script -t 10 -T 1 -b -q >/dev/null 2>&1
else
    ip addr add "$ip" dev eth0 || say "error bad ferry.ip=$ip"
    [ -z "$gw" ] || ip route add default via "$gw" || say "error bad ferry.gw=$gw"
fi

read -r boot < /proc/sys/kernel/random/boot_id
mkdir -p /www
echo "ferry-guest $boot" > /www/index.html
# -ll: keep listening, one cat per connection, so connections are independent.
nc -ll -p @ECHO_PORT@ -e cat </dev/null >/dev/null 2>&1 &
httpd -p @HTTP_PORT@ -h /www

say "ready $boot ip=$ip"
if [ -n "$dirty" ]; then
    # A writer rewriting $dirty MiB of random data in RAM (tmpfs) as fast as it can.
    dd if=/dev/urandom of=/tmp/dirty-src bs=1M count="$dirty" 2>/dev/null
    cp /tmp/dirty-src /tmp/dirty
    say "dirtying $dirty MiB"
    ( while :; do dd if=/tmp/dirty-src of=/tmp/dirty bs=1M conv=notrunc 2>/dev/null; done ) &
fi
n=0
while :; do
    n=$((n + 1))
    read -r up _ < /proc/uptime
    echo "ferry-tick $boot $n $up" >&3
    usleep @TICK_US@
done
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc event hook: apply the lease to $interface.
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/$mask" dev "$interface"
        for r in $router; do
            ip route replace default via "$r" dev "$interface"
            break
        done
        ;;
esac
exit 0
"""


def render_init() -> str:
    return (
        INIT_SCRIPT.replace("@ECHO_PORT@", str(ECHO_PORT))
        .replace("@HTTP_PORT@", str(HTTP_PORT))
        .replace("@TICK_US@", str(TICK_INTERVAL_MS * 1000))
    )


def initramfs_entries(busybox: bytes, applets: Sequence[str],
                      modules: Sequence[tuple[str, bytes]]) -> list[CpioEntry]:
    """Everything the guest's root holds; `modules` are (file name, ELF bytes) in load order."""
    files: list[CpioEntry] = [
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        CpioEntry("init", stat.S_IFREG | 0o755, render_init().encode()),
        CpioEntry("etc/ferry/udhcpc.script", stat.S_IFREG | 0o755, UDHCPC_SCRIPT.encode()),
        CpioEntry("etc/ferry/modules", stat.S_IFREG | 0o644,
                  "".join(f"{name}\n" for name, _ in modules).encode()),
    ]
    files += [CpioEntry(f"lib/modules/{name}", stat.S_IFREG | 0o644, elf) for name, elf in modules]
    taken = {f.name for f in files}
    files += [
        CpioEntry(applet, stat.S_IFLNK | 0o777, b"/bin/busybox")
        for applet in sorted(set(applets))
        if applet not in taken
    ]
    dirs = {"proc", "sys", "tmp", "run", "root"}
    for f in files:
        parts = f.name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    tree = [CpioEntry(d, stat.S_IFDIR | (0o1777 if d == "tmp" else 0o755))
            for d in sorted(dirs, key=lambda d: (d.count("/"), d))]
    return tree + files


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
    builder = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

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
