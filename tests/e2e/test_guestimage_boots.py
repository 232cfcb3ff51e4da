"""The test guest really boots under QEMU and counts on COM1 while it dirties memory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from scripts.testbed.guestimage import (
    broken_continuity,
    build_image,
    serial_counters,
    serial_ticks,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no qemu-system-x86_64"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("as", "ld", "objcopy")), reason="no GNU binutils"
    ),
]
HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
# SeaBIOS takes ~0.2 s under TCG but can take ~5 s under a KVM that emulates real mode.
DEADLINE_S = 30.0


def read_serial(path: Path) -> str:
    # Bytes, not read_text(): universal newlines would turn the guest's \r\n into \n.
    try:
        return path.read_bytes().decode("ascii", errors="replace")
    except FileNotFoundError:
        return ""


def test_guest_boots_prints_banner_and_counts(tmp_path: Path) -> None:
    image = build_image(tmp_path / "guest.img", dirty_mib=16, rate_mib_s=8)
    serial = tmp_path / "serial.log"
    argv = [
        "qemu-system-x86_64",
        "-machine", "pc,accel=" + ("kvm:tcg" if HAVE_KVM else "tcg"),
        "-m", "64",
        "-display", "none",
        "-nodefaults",
        "-drive", f"file={image},format=raw,if=ide",
        "-chardev", f"file,id=s0,path={serial}",
        "-device", "isa-serial,chardev=s0",
    ]  # fmt: skip
    with open(tmp_path / "qemu.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + DEADLINE_S
        counters: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:
            counters = serial_counters(read_serial(serial))
            if len(counters) >= 3:
                break
            time.sleep(0.05)
        text = read_serial(serial)
        why = f"serial: {text[-400:]!r}; qemu: {(tmp_path / 'qemu.log').read_text()[-400:]!r}"
        assert proc.poll() is None, f"QEMU exited with {proc.returncode}; {why}"
        assert len(counters) >= 3, f"fewer than 3 counters in {DEADLINE_S}s; {why}"
        banner = re.match(
            r"ferry-guest ready ram_mib=(\d+) dirty_mib=16 rate=8 boot=([0-9a-f]{16})\r\n", text
        )
        assert banner is not None, why
        assert 60 <= int(banner.group(1)) < 64, why  # 64 MiB less what the BIOS reserves
        assert counters == list(range(1, len(counters) + 1)), why
        ticks = serial_ticks(text)
        assert {t.boot for t in ticks} == {banner.group(2)}, why
        assert broken_continuity(ticks) is None, why
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
        proc.wait()
