"""The Linux test guest's kernel: finding it and its modules, ELF/PVH and bzImage unpacking.

Split from scripts/testbed/linuxguest.py, which re-exports these names.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

BOOT_DIR = Path("/boot")
MODULES_ROOT = Path("/lib/modules")

_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


class LinuxGuestError(RuntimeError):
    """A part of the guest is missing or unusable; the message is one line saying which."""


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
