"""The Linux test guest's builder: cpio writer, module and kernel handling, ticks, boot config."""

from __future__ import annotations

import ast
import gzip
import lzma
import shutil
import stat
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from lxml import etree

from scripts.testbed import initramfs, linuxguest
from scripts.testbed import kernel as kernel_module
from scripts.testbed.linuxguest import (
    CpioEntry,
    LinuxGuest,
    LinuxGuestError,
    Tick,
    build_guest,
    check_kernel_readable,
    continuity_problem,
    domain_xml,
    elf_segments,
    extract_vmlinux,
    find_busybox,
    find_kernel,
    has_pvh_entry,
    initramfs_entries,
    kernel_cmdline,
    module_load_order,
    module_name,
    parse_modules_dep,
    parse_ready,
    parse_ticks,
    qemu_argv,
    read_module,
    read_newc,
    render_init,
    write_newc,
)
from workers.domain_xml import parse_domain_xml

BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="no busybox")
BOOT = "0b9e1c4e-6d4f-4a3c-9a55-3c2f7d1e8a10"
OTHER = "f00dcafe-0000-4000-8000-123456789abc"

DIR, REG, LNK, CHR = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR


def sample_entries() -> list[CpioEntry]:
    # Names and sizes of every length mod 4, so every padding case is written and read.
    return [
        CpioEntry("d", DIR | 0o755),
        CpioEntry("d/ab", DIR | 0o700),
        CpioEntry("d/ab/f", REG | 0o644, b""),
        CpioEntry("d/ab/f1", REG | 0o600, b"x"),
        CpioEntry("d/ab/f12", REG | 0o644, b"xy"),
        CpioEntry("d/ab/f123", REG | 0o755, b"xyz"),
        CpioEntry("d/ab/f1234", REG | 0o644, b"wxyz\n" * 100),
        CpioEntry("d/link", LNK | 0o777, b"/bin/busybox"),
        CpioEntry("d/console", CHR | 0o600, rdev=(5, 1)),
    ]


# -- cpio ---------------------------------------------------------------------------------


def test_newc_round_trips() -> None:
    entries = sample_entries()
    archive = write_newc(entries)
    assert len(archive) % 4 == 0
    assert read_newc(archive) == entries


def test_newc_header_is_the_kernel_format() -> None:
    archive = write_newc([CpioEntry("init", REG | 0o755, b"#!/bin/sh\n")])
    fields = [int(archive[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
    assert archive[:6] == b"070701"
    # ino, mode, uid, gid, nlink, mtime, size, dev maj/min, rdev maj/min, namesize, check
    assert fields == [1, REG | 0o755, 0, 0, 1, 0, 10, 0, 0, 0, 0, 5, 0]
    assert archive[110:115] == b"init\0"
    assert archive[116:126] == b"#!/bin/sh\n"  # name padded to 116, a multiple of 4
    assert b"TRAILER!!!\0" in archive[126:]


def test_newc_is_deterministic() -> None:
    assert write_newc(sample_entries()) == write_newc(sample_entries())


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([CpioEntry("/abs", REG)], "clean relative path"),
        ([CpioEntry("a/../b", REG)], "clean relative path"),
        ([CpioEntry("a//b", REG)], "clean relative path"),
        ([CpioEntry("", REG)], "clean relative path"),
        ([CpioEntry("TRAILER!!!", REG)], "may not be named"),
        ([CpioEntry("a", REG), CpioEntry("a", REG)], "appears twice"),
        ([CpioEntry("a/b", REG)], "comes before its directory 'a'"),
        ([CpioEntry("a", REG), CpioEntry("a/b", REG)], "comes before its directory 'a'"),
        ([CpioEntry("a", DIR | 0o755, b"x")], "is not a file but has data"),
        ([CpioEntry("a", LNK | 0o777)], "symlink 'a' has no target"),
        ([CpioEntry("a", stat.S_IFIFO | 0o644)], "unsupported file type"),
    ],
)
def test_newc_refuses_what_the_kernel_would_mishandle(
    entries: list[CpioEntry], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        write_newc(entries)


def test_read_newc_refuses_garbage() -> None:
    archive = write_newc(sample_entries())
    with pytest.raises(ValueError, match="no newc header at offset 0"):
        read_newc(b"070707" + archive[6:])
    with pytest.raises(ValueError, match="truncated header at offset 112"):
        read_newc(archive[:200])
    with pytest.raises(ValueError, match="member 'd/ab/f1234' is truncated"):
        read_newc(archive[: archive.index(b"wxyz") + 100])
    with pytest.raises(ValueError, match="no newc header"):  # no trailer
        read_newc(archive[: archive.index(b"070701", archive.index(b"TRAILER") - 120)])


@needs_busybox
def test_busybox_cpio_lists_and_extracts_it(tmp_path: Path) -> None:
    assert BUSYBOX is not None
    entries = [e for e in sample_entries() if not stat.S_ISCHR(e.mode)]
    archive = write_newc(entries)
    listed = subprocess.run([BUSYBOX, "cpio", "-t"], input=archive, capture_output=True,
                            check=True).stdout.decode().split()
    assert listed == [e.name for e in entries]
    subprocess.run([BUSYBOX, "cpio", "-i", "-d"], input=archive, cwd=tmp_path,
                   capture_output=True, check=True)
    assert (tmp_path / "d/ab/f1234").read_bytes() == b"wxyz\n" * 100
    assert (tmp_path / "d/ab/f").read_bytes() == b""
    assert stat.S_IMODE((tmp_path / "d/ab/f123").stat().st_mode) == 0o755
    assert (tmp_path / "d/link").readlink() == Path("/bin/busybox")


# -- modules ------------------------------------------------------------------------------

DEP = """kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz \
kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/net/core/failover.ko.xz:
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz \
kernel/net/core/failover.ko.xz kernel/drivers/virtio/virtio.ko.xz \
kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko.xz
"""


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("kernel/drivers/net/virtio_net.ko", "virtio_net"),
        ("kernel/drivers/net/virtio_net.ko.xz", "virtio_net"),
        ("kernel/drivers/net/virtio_net.ko.zst", "virtio_net"),
        ("kernel/drivers/char/hw_random/virtio-rng.ko.gz", "virtio_rng"),
    ],
)
def test_module_name(path: str, name: str) -> None:
    assert module_name(path) == name


def test_load_order_puts_every_dependency_first() -> None:
    deps = parse_modules_dep(DEP)
    order = [module_name(p) for p in module_load_order(deps, ["virtio_pci", "virtio_net"])]
    assert sorted(order) == sorted(["virtio_ring", "virtio", "virtio_pci_modern_dev",
                                    "virtio_pci", "failover", "net_failover", "virtio_net"])
    for path, needs in deps.items():
        if module_name(path) in order:
            for need in needs:
                assert order.index(module_name(need)) < order.index(module_name(path))


def test_load_order_skips_built_in_modules_and_names_missing_ones() -> None:
    deps = parse_modules_dep(DEP)
    builtin = ["kernel/drivers/virtio/virtio_pci.ko", "kernel/drivers/net/virtio_net.ko"]
    assert module_load_order(deps, ["virtio_pci", "virtio_net"], builtin) == []
    assert module_load_order(deps, ["virtio-rng"]) == [
        "kernel/drivers/virtio/virtio_ring.ko.xz",
        "kernel/drivers/virtio/virtio.ko.xz",
        "kernel/drivers/char/hw_random/virtio-rng.ko.xz",
    ]
    with pytest.raises(LinuxGuestError, match="kernel has no module e1000e"):
        module_load_order(deps, ["e1000e"])


def test_load_order_refuses_a_cycle() -> None:
    with pytest.raises(LinuxGuestError, match="cycle"):
        module_load_order({"a.ko": ["b.ko"], "b.ko": ["a.ko"]}, ["a"])


def test_read_module_decompresses(tmp_path: Path) -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 4
    (tmp_path / "m.ko").write_bytes(elf)
    (tmp_path / "m.ko.xz").write_bytes(lzma.compress(elf, format=lzma.FORMAT_XZ))
    (tmp_path / "m.ko.gz").write_bytes(gzip.compress(elf))
    for name in ("m.ko", "m.ko.xz", "m.ko.gz"):
        assert read_module(tmp_path / name) == elf
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-q", str(tmp_path / "m.ko"), "-o", str(tmp_path / "m.ko.zst")],
                       check=True)
        assert read_module(tmp_path / "m.ko.zst") == elf


# -- kernel and ELF -----------------------------------------------------------------------


def fake_elf(notes: Sequence[tuple[bytes, int]] = (), interp: bytes | None = None) -> bytes:
    """A 64-bit ELF with one PT_NOTE segment holding `notes` (name, type) and an optional
    PT_INTERP."""
    note_blob = b""
    for name, n_type in notes:
        raw = name + b"\0"
        desc = b"\0" * 8
        note_blob += struct.pack("<III", len(raw), len(desc), n_type)
        note_blob += raw + bytes(-len(raw) % 4) + desc
    segments = [(4, note_blob)] + ([(3, interp + b"\0")] if interp is not None else [])
    phoff, phentsize = 64, 56
    data_at = phoff + phentsize * len(segments)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HH", header, 0x36, phentsize, len(segments))
    phdrs, body = b"", b""
    for p_type, blob in segments:
        phdrs += struct.pack("<IIQQQQQQ", p_type, 4, data_at + len(body), 0, 0, len(blob),
                             len(blob), 4)
        body += blob
    return bytes(header) + phdrs + body


def fake_bzimage(payload: bytes, *, version: int = 0x20F, setup_sects: int = 2) -> bytes:
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, version)
    struct.pack_into("<II", image, 0x248, 64, len(payload))
    return bytes(image) + bytes(64) + payload + b"trailing code"


PVH_ELF = fake_elf([(b"Xen", 6), (b"Xen", 18)])


def test_pvh_note_is_found_only_where_it_is() -> None:
    assert has_pvh_entry(PVH_ELF)
    assert not has_pvh_entry(fake_elf([(b"Xen", 6), (b"GNU", 18)]))
    assert not has_pvh_entry(fake_elf())


def test_elf_segments_show_an_interpreter() -> None:
    types = [t for t, _, _ in elf_segments(fake_elf(interp=b"/lib64/ld-linux-x86-64.so.2"))]
    assert 3 in types
    with pytest.raises(LinuxGuestError, match="not a 64-bit little-endian ELF"):
        elf_segments(b"MZ\x90\x00")


def test_extract_vmlinux_from_xz_and_gzip_payloads() -> None:
    size = struct.pack("<I", len(PVH_ELF))  # the kernel appends the uncompressed size
    xz = lzma.compress(PVH_ELF, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    assert extract_vmlinux(fake_bzimage(xz + size)) == PVH_ELF
    assert extract_vmlinux(fake_bzimage(gzip.compress(PVH_ELF) + size)) == PVH_ELF


@pytest.mark.parametrize(
    "image",
    [
        b"\x7fELF not a bzImage",
        fake_bzimage(lzma.compress(PVH_ELF, format=lzma.FORMAT_XZ), version=0x207),
        fake_bzimage(b"\x28\xb5\x2f\xfd zstd is not unpacked here"),
        fake_bzimage(b"\xfd7zXZ\x00 broken"),
        fake_bzimage(gzip.compress(b"not an ELF")),
    ],
)
def test_extract_vmlinux_gives_up_quietly(image: bytes) -> None:
    assert extract_vmlinux(image) is None


def test_find_kernel_takes_the_newest_with_modules(tmp_path: Path) -> None:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for release in ("6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-11-amd64"):
        (boot / f"vmlinuz-{release}").write_bytes(b"k")
    for release in ("6.1.0-9-amd64", "6.1.0-10-amd64"):  # -11 has no modules
        (mods / release).mkdir(parents=True)
        (mods / release / "modules.dep").write_text("")
    assert find_kernel(boot, mods) == (boot / "vmlinuz-6.1.0-10-amd64", "6.1.0-10-amd64")
    with pytest.raises(LinuxGuestError, match="install the Debian package linux-image-amd64"):
        find_kernel(tmp_path / "nowhere", mods)


def test_an_unreadable_kernel_is_said_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = tmp_path / "vmlinuz-6.1.0-1-amd64"
    with pytest.raises(LinuxGuestError, match=r"cannot be read: No such file") as missing:
        check_kernel_readable(kernel)
    kernel.write_bytes(b"k")

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    # check_kernel_readable lives in kernel.py: open is looked up there.
    monkeypatch.setattr(kernel_module, "open", refuse, raising=False)
    with pytest.raises(LinuxGuestError, match=r"is not readable by uid \d+: run `sudo chmod") as e:
        check_kernel_readable(kernel)
    for exc in (missing.value, e.value):
        assert "\n" not in str(exc)


def test_a_dynamic_busybox_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dynamic = tmp_path / "busybox"
    dynamic.write_bytes(fake_elf(interp=b"/lib64/ld-linux-x86-64.so.2"))
    dynamic.chmod(0o755)
    monkeypatch.setattr(initramfs, "BUSYBOX_PATHS", (tmp_path / "none", dynamic))
    with pytest.raises(LinuxGuestError, match=r"dynamically linked: install .* busybox-static"):
        find_busybox()
    monkeypatch.setattr(initramfs, "BUSYBOX_PATHS", (tmp_path / "none",))
    with pytest.raises(LinuxGuestError, match="no busybox"):
        find_busybox()


# -- the initramfs ------------------------------------------------------------------------


def test_init_script_is_filled_in() -> None:
    init = render_init()
    assert "@" not in init.replace("$@", "")
    assert "nc -ll -p 7 -e cat" in init
    assert "httpd -p 80 -h /www" in init
    assert "usleep 100000" in init
    assert "/proc/sys/kernel/random/boot_id" in init
    assert init.startswith("#!/bin/sh\n")


def test_initramfs_holds_what_init_needs() -> None:
    modules = [("virtio_ring.ko", b"\x7fELF ring"), ("virtio_net.ko", b"\x7fELF net")]
    applets = ["bin/sh", "usr/bin/nc", "sbin/insmod", "linuxrc", "bin/busybox"]
    entries = initramfs_entries(b"\x7fELF busybox", applets, modules)
    archive = read_newc(write_newc(entries))  # parents first, or write_newc refuses
    by_name = {e.name: e for e in archive}
    assert by_name["init"].mode == REG | 0o755
    assert by_name["init"].data == render_init().encode()
    assert by_name["dev/console"].mode == CHR | 0o600
    assert by_name["dev/console"].rdev == (5, 1)
    assert by_name["bin/busybox"].data == b"\x7fELF busybox"
    assert by_name["usr/bin/nc"] == CpioEntry("usr/bin/nc", LNK | 0o777, b"/bin/busybox")
    assert by_name["linuxrc"].mode == LNK | 0o777
    assert by_name["etc/ferry/modules"].data == b"virtio_ring.ko\nvirtio_net.ko\n"
    assert by_name["lib/modules/virtio_net.ko"].data == b"\x7fELF net"
    for d in ("proc", "sys", "tmp", "etc/ferry", "usr/bin"):
        assert stat.S_ISDIR(by_name[d].mode), d


def fake_system(tmp_path: Path, modules_dep: str = DEP) -> tuple[Path, Path]:
    """A /boot kernel with a PVH payload and a /lib/modules tree with fake .ko.xz files."""
    boot, mods = tmp_path / "boot", tmp_path / "lib-modules"
    boot.mkdir()
    size = struct.pack("<I", len(PVH_ELF))
    xz = lzma.compress(PVH_ELF, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    (boot / "vmlinuz-6.1.0-1-amd64").write_bytes(fake_bzimage(xz + size))
    root = mods / "6.1.0-1-amd64"
    root.mkdir(parents=True)
    (root / "modules.dep").write_text(modules_dep)
    (root / "modules.builtin").write_text("kernel/drivers/block/loop.ko\n")
    for path in parse_modules_dep(modules_dep):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(lzma.compress(b"\x7fELF " + path.encode()))
    return boot / "vmlinuz-6.1.0-1-amd64", mods


@needs_busybox
def test_build_guest_builds_once_and_then_uses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel, mods = fake_system(tmp_path)
    cache = tmp_path / "cache"
    guest = build_guest(cache, kernel=kernel, modules_root=mods)
    assert guest.release == "6.1.0-1-amd64"
    assert guest.boot_kernel == kernel
    assert guest.kernel.parent == cache and guest.kernel.read_bytes() == PVH_ELF
    assert guest.modules == ("virtio_pci_modern_dev", "virtio_ring", "virtio", "virtio_pci",
                             "failover", "net_failover", "virtio_net")
    files = {e.name: e for e in read_newc(gzip.decompress(guest.initrd.read_bytes()))}
    assert files["lib/modules/virtio_net.ko"].data == (
        b"\x7fELF kernel/drivers/net/virtio_net.ko.xz"
    )
    assert files["etc/ferry/modules"].data.decode().split() == [f"{m}.ko" for m in guest.modules]
    assert "bin/sh" in files

    def no_rebuild(*_args: object) -> bytes:
        raise AssertionError("cache missed")

    monkeypatch.setattr(linuxguest, "write_newc", no_rebuild)
    monkeypatch.setattr(linuxguest, "extract_vmlinux", no_rebuild)
    assert build_guest(cache, kernel=kernel, modules_root=mods) == guest


def test_the_cache_key_covers_every_module_of_the_builder() -> None:
    # linuxguest.py and the test-bed modules it imports, directly or through another.
    root = Path(linuxguest.__file__).parent
    todo, seen = ["linuxguest"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "scripts.testbed":
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "scripts.testbed."
            ):
                todo.append(str(node.module).rpartition(".")[2])
    assert seen == {"linuxguest", "cpio", "kernel", "initramfs"}
    assert {p.resolve() for p in linuxguest.BUILDER_SOURCES} == {
        (root / f"{name}.py").resolve() for name in seen
    }


@needs_busybox
def test_a_change_to_any_builder_module_rebuilds_the_initramfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel, mods = fake_system(tmp_path)
    copies = []
    for source in linuxguest.BUILDER_SOURCES:
        copy = tmp_path / "src" / source.name
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(source.read_bytes())
        copies.append(copy)
    monkeypatch.setattr(linuxguest, "BUILDER_SOURCES", tuple(copies))
    initrds = {build_guest(tmp_path / "cache", kernel=kernel, modules_root=mods).initrd}
    for copy in copies:
        copy.write_bytes(copy.read_bytes() + b"# changed\n")
        initrds.add(build_guest(tmp_path / "cache", kernel=kernel, modules_root=mods).initrd)
    assert len(initrds) == 1 + len(copies)


@needs_busybox
def test_build_guest_boots_the_bzimage_without_a_pvh_entry(tmp_path: Path) -> None:
    kernel, mods = fake_system(tmp_path)
    kernel.write_bytes(fake_bzimage(gzip.compress(fake_elf())))
    guest = build_guest(tmp_path / "cache", kernel=kernel, modules_root=mods)
    assert guest.kernel == kernel
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()] == ["initrd"]


# -- ticks --------------------------------------------------------------------------------


def test_ticks_are_parsed_from_complete_lines_only() -> None:
    text = (
        "[    3.09] Run /init as init process\r\n"
        f"ferry-guest ready {BOOT} ip=10.0.2.15/24\r\n"
        f"ferry-tick {BOOT} 1 3.58\r\n"
        f"ferry-tick {BOOT} 2 3.68\r\n"
        f"ferry-tick {BOOT} 3 3.7[   4.1] split by the kernel\r\n"
        f"ferry-tick {BOOT} 4 3.90\n"
        f"ferry-tick {BOOT} 5 4.0"
    )
    assert parse_ticks(text) == [Tick(BOOT, 1, 3.58), Tick(BOOT, 2, 3.68), Tick(BOOT, 4, 3.9)]
    assert parse_ready(text) == [(BOOT, "10.0.2.15/24")]


@pytest.mark.parametrize(
    ("ticks", "problem"),
    [
        ([Tick(BOOT, 1, 3.5), Tick(BOOT, 2, 3.6), Tick(BOOT, 9, 4.3)], None),
        ([], "no ticks"),
        ([Tick(BOOT, 7, 3.5), Tick(OTHER, 8, 3.6)], f"boot id changed from {BOOT} to {OTHER}"),
        ([Tick(BOOT, 7, 3.5), Tick(BOOT, 7, 3.6)], "counter went from 7 to 7"),
        ([Tick(BOOT, 7, 3.5), Tick(BOOT, 1, 3.6)], "counter went from 7 to 1"),
        ([Tick(BOOT, 7, 3.5), Tick(BOOT, 8, 3.4)], "uptime went back from 3.5 to 3.4"),
    ],
)
def test_continuity(ticks: list[Tick], problem: str | None) -> None:
    found = continuity_problem(ticks)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found, found


def test_a_reboot_is_not_continuity() -> None:
    before = parse_ticks(f"ferry-tick {BOOT} 41 7.10\r\nferry-tick {BOOT} 42 7.20\r\n")
    after = parse_ticks(f"ferry-tick {OTHER} 43 7.30\r\n")
    assert "rebooted" in (continuity_problem(before + after) or "")


# -- boot configuration -------------------------------------------------------------------

GUEST = LinuxGuest(Path("/cache/vmlinux.elf"), Path("/cache/initrd.cpio.gz"), "6.1.0-1-amd64",
                   "1.35.0", ("virtio_net",), Path("/boot/vmlinuz-6.1.0-1-amd64"))


def test_kernel_cmdline() -> None:
    assert kernel_cmdline() == "console=ttyS0 quiet panic=-1"
    assert kernel_cmdline("10.0.2.15/24", "10.0.2.2", ["loglevel=7"]) == (
        "console=ttyS0 quiet panic=-1 ferry.ip=10.0.2.15/24 ferry.gw=10.0.2.2 loglevel=7"
    )
    with pytest.raises(ValueError, match="ip must be ADDRESS/PREFIX"):
        kernel_cmdline("10.0.2.15 rdinit=/bin/sh")
    with pytest.raises(ValueError, match="gw must be an IPv4 address"):
        kernel_cmdline("dhcp", "gw")
    assert kernel_cmdline("10.0.2.15/24", dirty_mib=64).endswith("ferry.dirty=64")


def test_the_domain_xml_of_the_linux_guest_is_one_ferry_runs_as_it_is() -> None:
    xml = domain_xml("lin", GUEST, Path("/tmp/s.log"), bridge="br0", domain_type="qemu",
                     cmdline=kernel_cmdline("10.0.2.15/24", dirty_mib=8))
    d = parse_domain_xml(xml)
    assert (d.kernel, d.initrd) == ("/cache/vmlinux.elf", "/cache/initrd.cpio.gz")
    assert d.cmdline is not None and "ferry.dirty=8" in d.cmdline
    assert [(n.type, n.source, n.model) for n in d.interfaces] == [("bridge", "br0", "virtio")]
    user = parse_domain_xml(domain_xml("lin", GUEST, Path("/tmp/s.log"), forwards={4007: 7}))
    assert [(f.address, f.start, f.to) for f in user.interfaces[0].port_forwards] == [
        ("127.0.0.1", 4007, 7)]


def test_qemu_argv_boots_directly_with_a_virtio_nic() -> None:
    argv = qemu_argv(GUEST, Path("/tmp/s.log"), forwards={4007: 7, 4080: 80},
                     mac="52:54:00:aa:bb:cc", accel="tcg")
    opts = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == "qemu-system-x86_64"
    assert opts["-machine"] == "pc,accel=tcg"
    assert opts["-kernel"] == "/cache/vmlinux.elf"
    assert opts["-initrd"] == "/cache/initrd.cpio.gz"
    assert opts["-append"].startswith("console=ttyS0 ")
    assert "ferry.ip=10.0.2.15/24 ferry.gw=10.0.2.2" in opts["-append"]
    assert "-no-reboot" in argv
    assert ("user,id=n0,hostfwd=tcp:127.0.0.1:4007-:7,hostfwd=tcp:127.0.0.1:4080-:80"
            in argv)
    assert "virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:cc" in argv
    assert "file,id=s0,path=/tmp/s.log,append=on" in argv
    with pytest.raises(ValueError, match="mac must be"):
        qemu_argv(GUEST, Path("/tmp/s.log"), mac="52:54:00:AA:BB")


def attr(node: etree._Element, path: str, name: str) -> str | None:
    found = node.find(path)
    assert found is not None, path
    return found.get(name)


def test_domain_xml_boots_directly_on_user_networking() -> None:
    xml = domain_xml("lg-1", GUEST, Path("/tmp/it's.log"), mac="52:54:00:00:00:01",
                     forwards={4007: 7}, uuid=OTHER, domain_type="kvm")
    root = etree.fromstring(xml.encode())
    assert root.get("type") == "kvm"
    assert root.findtext("uuid") == OTHER
    os_ = root.find("os")
    assert os_ is not None
    assert os_.findtext("kernel") == "/cache/vmlinux.elf"
    assert os_.findtext("initrd") == "/cache/initrd.cpio.gz"
    assert os_.findtext("cmdline") == "console=ttyS0 quiet panic=-1 ferry.ip=10.0.2.15/24 " \
        "ferry.gw=10.0.2.2"
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "user"
    assert attr(nic, "mac", "address") == "52:54:00:00:00:01"
    assert attr(nic, "model", "type") == "virtio"
    assert (attr(nic, "portForward/range", "start"), attr(nic, "portForward/range", "to")) == (
        "4007", "7")
    assert attr(root, "devices/serial/source", "path") == "/tmp/it's.log"


def test_domain_xml_on_a_bridge_uses_dhcp_unless_told() -> None:
    root = etree.fromstring(domain_xml("lg-2", GUEST, Path("/s.log"), bridge="br0").encode())
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "bridge"
    assert attr(nic, "source", "bridge") == "br0"
    assert nic.find("portForward") is None
    assert root.findtext("os/cmdline") == "console=ttyS0 quiet panic=-1"
    assert root.get("type") in ("kvm", "qemu")
