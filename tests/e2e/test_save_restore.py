"""Save, restore and dump on real workers and real QEMU.

The guests are TCG (`domain_type="qemu"`): they boot in 0.2 s where this
machine's KVM (PVM) takes ~4 s, which keeps the six compressor round trips fast.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.testbed.guestimage import broken_continuity, build_image, serial_ticks
from scripts.testbed.stack import wait_for
from tasks.client import Client
from tests.conftest import CliResult, Guest, pmemsave, qemu_pids_of, wait_info
from workers.errors import FerryError
from workers.image_format import COMPRESSORS, ImageHeader, encode_header, read_header

MIB = 1024 * 1024
FIXED_XML_BYTE = 70  # a byte of the domain XML in the header (it starts at 64)


def _started(client: Client, make_guest: Callable[..., Guest], host: str = "alpha",
             **kw: Any) -> Guest:
    guest = make_guest(domain_type="qemu", **kw)
    client.call(host, "define", xml=guest.xml)
    client.call(host, "start", domain=guest.name)
    guest.wait_counter_above(2)
    return guest


def _state(client: Client, host: str, name: str) -> tuple[str, str]:
    info = client.call(host, "dominfo", domain=name)
    return info["state"], info["reason"]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".ferry-" in p.name)


@pytest.mark.parametrize("compression", list(COMPRESSORS))
def test_round_trip_keeps_memory_and_the_counter_goes_on(
        compression: str, client: Client, make_guest: Callable[..., Guest],
        tmp_path: Path) -> None:
    guest = _started(client, make_guest)  # dirties 4 MiB at 4 MiB/s
    client.call("alpha", "suspend", domain=guest.name)
    last = guest.counters()[-1]
    before = pmemsave(client, "alpha", guest.name, 64 * MIB, tmp_path / "before.mem")
    image = tmp_path / f"guest.{compression}"

    saved = client.call("alpha", "save", domain=guest.name, path=str(image),
                        compression=compression, running=True)

    assert (saved["state"], saved["reason"]) == ("shutoff", "saved")
    assert _state(client, "alpha", guest.name) == ("shutoff", "saved")
    assert qemu_pids_of(guest.uuid) == []
    assert stat.S_IMODE(image.stat().st_mode) == 0o600 and _leftovers(tmp_path) == []
    with open(image, "rb") as f:
        header = read_header(f, image.stat().st_size)
    assert (header.compression, header.was_running) == (compression, True)
    done = client.call("alpha", "domjobinfo", domain=guest.name, completed=True)
    assert (done["type"], done["operation"]) == ("completed", "save")

    restored = client.call("alpha", "restore", path=str(image), paused=True)
    assert (restored["state"], restored["reason"]) == ("paused", "user")
    assert pmemsave(client, "alpha", guest.name, 64 * MIB, tmp_path / "after.mem") == before
    client.call("alpha", "resume", domain=guest.name)
    guest.wait_kept_running()  # RAM restored: the boot it started with, counting on by one
    after = guest.counters()
    assert after[after.index(last) + 1] == last + 1, "the counter went on, no reboot"
    assert guest.serial.read_text().count("ferry-guest ready") == 1


def test_cli_save_of_a_running_guest_restores_running(
        ferry: Callable[..., CliResult], client: Client, make_guest: Callable[..., Guest],
        tmp_path: Path) -> None:
    guest = _started(client, make_guest)
    image = tmp_path / "img" / "guest.zst"
    image.parent.mkdir()
    res = ferry("save", "-H", "alpha", guest.name, str(guest.disk))
    assert res.rc == 1 and f"{guest.disk} is disk hda of domain" in res.err

    res = ferry("save", "-H", "alpha", guest.name, str(image), "--compress", "zstd",
                "--bypass-cache")
    assert res.rc == 0, res.err
    assert f"saved to {image}" in res.out

    res = ferry("restore", "-H", "alpha", str(image), "--json")
    assert res.rc == 0, res.err
    info = json.loads(res.out)
    assert (info["name"], info["state"], info["reason"]) == (guest.name, "running", "restored")
    assert qemu_pids_of(guest.uuid) == [info["pid"]]
    guest.wait_kept_running()
    res = ferry("restore", "-H", "alpha", str(image))
    assert res.rc == 1 and "already active" in res.err


def test_restore_with_xml_checks_the_abi(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    guest = _started(client, make_guest)
    image = tmp_path / "guest.img"
    client.call("alpha", "save", domain=guest.name, path=str(image), paused=True)
    bigger = guest.xml.replace("<memory unit='MiB'>64<", "<memory unit='MiB'>128<") \
        .replace("<currentMemory unit='MiB'>64<", "<currentMemory unit='MiB'>128<")
    with pytest.raises(FerryError, match="target domain memory 131072 KiB does not match"):
        client.call("alpha", "restore", path=str(image), xml=bigger)
    assert qemu_pids_of(guest.uuid) == []

    other_log = tmp_path / "other.serial"
    moved = guest.xml.replace(str(guest.serial), str(other_log))
    info = client.call("alpha", "restore", path=str(image), xml=moved, running=True)
    assert (info["state"], info["reason"]) == ("running", "restored")
    wait_for(lambda: "ferry-guest" in (other_log.read_text() if other_log.exists() else ""),
             10, "the counter in the new serial log")
    # The restored RAM goes on counting where the saved guest stopped, in its boot (the
    # two logs joined: a line the save cut in two is whole again).
    Guest(guest.name, guest.uuid, moved, guest.disk, other_log).wait_kept_running()
    both = serial_ticks(guest.serial.read_text() + other_log.read_text())
    assert broken_continuity(both) is None, both


@pytest.fixture
def good_image(client: Client, make_guest: Callable[..., Guest], tmp_path: Path) -> Path:
    guest = _started(client, make_guest)
    image = tmp_path / "good.gz"
    client.call("alpha", "save", domain=guest.name, path=str(image), compression="gzip")
    client.call("alpha", "undefine", domain=guest.name)
    return image


def _broken_images(good: Path) -> Iterator[tuple[str, bytes, str]]:
    data = good.read_bytes()
    with open(good, "rb") as f:
        header = read_header(f, len(data))
    off = header.data_offset
    yield "truncated", data[: off + header.data_len // 2], "image is truncated"
    yield "bad magic", b"NOTFERRY" + data[8:], "bad magic"
    yield "unknown compressor", encode_header(ImageHeader(
        header.xml, "lz4", True, header.data_len)) + data[off:], "unknown compression 'lz4'"
    hostile = header.xml.replace("<domain", '<!DOCTYPE d [<!ENTITY x "boom">]>\n<domain', 1)
    hostile_header = encode_header(ImageHeader(hostile, "gzip", True, header.data_len))
    yield "hostile XML", hostile_header + data[off:], "entity declarations are not allowed"
    flipped = bytearray(data)
    flipped[off + header.data_len // 2] ^= 0xFF
    yield "corrupted stream", bytes(flipped), "decompressor gzip failed|loading the image"
    flipped = bytearray(data)
    flipped[FIXED_XML_BYTE] ^= 0x01
    yield "corrupted header", bytes(flipped), "checksum mismatch"


def test_broken_images_are_refused_and_nothing_starts(
        ferry: Callable[..., CliResult], client: Client, good_image: Path,
        tmp_path: Path) -> None:
    with open(good_image, "rb") as f:
        header = read_header(f, good_image.stat().st_size)
    uuid = header.xml.split("<uuid>")[1].split("</uuid>")[0]
    for what, data, message in _broken_images(good_image):
        bad = tmp_path / f"bad-{what.replace(' ', '-')}"
        bad.write_bytes(data)
        res = ferry("restore", "-H", "alpha", str(bad))
        assert res.rc == 1 and re.search(message, res.err), (what, res.err)
        assert res.err.startswith("error: ") and res.err.count("\n") == 1, (what, res.err)
        assert qemu_pids_of(uuid) == [], what
        assert all(d["uuid"] != uuid for d in client.call("alpha", "list", all=True)), what


def test_abort_during_save_resumes_the_guest_and_leaves_no_file(
        ferry: Callable[..., CliResult], client: Client, make_guest: Callable[..., Guest],
        image_dir: Path, tmp_path: Path) -> None:
    # 48 MiB of random bytes through bzip2 (~10 MB/s here): seconds to abort in.
    random_img = build_image(image_dir / "random48.img", random_mib=48, rate_mib_s=0)
    guest = make_guest(domain_type="qemu", image=random_img)
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    guest.wait_counter_above(1)  # the counter starts once the random fill is done
    image = tmp_path / "aborted.bz2"
    errors: list[Exception] = []

    def save() -> None:
        try:
            client.call("alpha", "save", domain=guest.name, path=str(image),
                        compression="bzip2")
        except Exception as exc:
            errors.append(exc)

    saver = threading.Thread(target=save)
    saver.start()
    try:
        info = wait_for(lambda: _saving(client, guest.name), 20, "the save to copy memory")
        assert info["operation"] == "save" and info["data_total"] >= 64 * MIB
        res = ferry("domjobabort", "-H", "alpha", guest.name)
        assert res.rc == 0, res.err
    finally:
        saver.join(60)
    assert len(errors) == 1 and "aborted" in str(errors[0])
    assert _state(client, "alpha", guest.name) == ("running", "save_canceled")
    assert not image.exists() and _leftovers(tmp_path) == []
    guest.wait_kept_running()
    done = client.call("alpha", "domjobinfo", domain=guest.name, completed=True)
    assert (done["type"], done["operation"]) == ("failed", "save")


def _saving(client: Client, name: str) -> dict[str, Any] | None:
    info = client.call("alpha", "domjobinfo", domain=name)
    return info if (info.get("data_processed") or 0) > 0 else None


def test_a_failing_compressor_ends_the_save_with_the_guest_running(
        client: Client, make_guest: Callable[..., Guest], faulty_host: Callable[[str], str],
        tmp_path: Path) -> None:
    host = faulty_host("save.compressor=bad-arg")  # gzip gets an option it refuses
    guest = _started(client, make_guest, host)
    image = tmp_path / "never.gz"
    with pytest.raises(FerryError) as err:
        client.call(host, "save", domain=guest.name, path=str(image), compression="gzip")
    assert "compressor gzip failed (exit status 1)" in str(err.value)
    assert "invalid option" in str(err.value)
    assert _state(client, host, guest.name) == ("running", "save_canceled")
    assert not image.exists() and _leftovers(tmp_path) == []
    guest.wait_kept_running()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real full disk (needs root to mount; skipped otherwise)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs",
                          str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("compression", ["raw", "zstd"])
def test_a_full_disk_ends_the_save_with_the_guest_running(
        compression: str, client: Client, make_guest: Callable[..., Guest],
        image_dir: Path, tiny_fs: Path) -> None:
    random_img = build_image(image_dir / "random8.img", random_mib=8, rate_mib_s=0)
    guest = _started(client, make_guest, image=random_img)
    image = tiny_fs / "full.img"
    with pytest.raises(FerryError) as err:
        client.call("alpha", "save", domain=guest.name, path=str(image),
                    compression=compression)
    assert "No space left on device" in str(err.value)
    assert _state(client, "alpha", guest.name) == ("running", "save_canceled")
    assert os.listdir(tiny_fs) == []


def test_dump_writes_an_elf_core_and_the_guest_runs_on(
        ferry: Callable[..., CliResult], client: Client, make_guest: Callable[..., Guest],
        tmp_path: Path) -> None:
    guest = _started(client, make_guest)
    core = tmp_path / "guest.core"
    res = ferry("dump", "-H", "alpha", guest.name, str(core))
    assert res.rc == 0, res.err
    head = core.read_bytes()[:18]
    assert head[:4] == b"\x7fELF" and struct.unpack_from("<H", head, 16)[0] == 4  # ET_CORE
    assert stat.S_IMODE(core.stat().st_mode) == 0o600
    assert _state(client, "alpha", guest.name) == ("running", "unpaused")
    done = client.call("alpha", "domjobinfo", domain=guest.name, completed=True)
    assert (done["type"], done["operation"]) == ("completed", "dump")

    mem = tmp_path / "guest.mem"
    info = client.call("alpha", "dump", domain=guest.name, path=str(mem), memory_only=True,
                       live=True)
    assert 64 * MIB <= info["size"] == mem.stat().st_size <= 65 * MIB
    assert _state(client, "alpha", guest.name) == ("running", "unpaused")
    client.call("alpha", "suspend", domain=guest.name)
    kdump = tmp_path / "guest.kdump"
    client.call("alpha", "dump", domain=guest.name, path=str(kdump), memory_only=True,
                format="kdump-zlib")
    assert kdump.read_bytes().startswith(b"makedumpfile")  # flattened: QEMU streams it
    assert _state(client, "alpha", guest.name) == ("paused", "user")
    res = ferry("dump", "-H", "alpha", guest.name, str(tmp_path / "x"), "--format", "kdump-lzo")
    assert res.rc == 1 and "needs --memory-only" in res.err
    assert _leftovers(tmp_path) == []
    wait_info(client, "alpha", guest.name, lambda i: i["state"] == "paused")
