"""The test guest builder validates its arguments, patches parameters and parses serial output."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from scripts.testbed import guestimage
from scripts.testbed.guestimage import (
    IMAGE_SIZE,
    MAGIC,
    GuestBuildError,
    GuestParams,
    build_image,
    main,
    patch_params,
    serial_counters,
)

HAVE_BINUTILS = all(shutil.which(t) for t in ("as", "ld", "objcopy"))
needs_binutils = pytest.mark.skipif(not HAVE_BINUTILS, reason="GNU as/ld/objcopy not installed")


def decode(block: bytes) -> tuple[int, ...]:
    fields = struct.unpack_from("<8s9I", block)
    assert fields[0] == MAGIC
    return fields[1:]


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dirty_mib": -1}, "dirty_mib must be an integer in 0..3070, got -1"),
        ({"dirty_mib": 3071}, "dirty_mib must be an integer in 0..3070"),
        ({"random_mib": 4096}, "random_mib must be an integer in 0..3070"),
        ({"random_mib": 3000, "text_mib": 100}, "text_mib must be an integer in 0..70"),
        ({"random_mib": 1.5}, "random_mib must be an integer"),
        ({"dirty_mib": True}, "dirty_mib must be an integer"),
        ({"rate_mib_s": -8}, "rate_mib_s must be an integer in 0..1000000 or None for max"),
        ({"rate_mib_s": "max"}, "rate_mib_s must be an integer"),
        ({"counter_interval_ms": 0}, "counter_interval_ms must be an integer in 1..60000"),
        ({"counter_interval_ms": 60_001}, "counter_interval_ms must be an integer"),
    ],
)
def test_bad_arguments_raise_one_clear_value_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")) as info:
        GuestParams(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_build_image_validates_before_writing_anything(tmp_path: Path) -> None:
    out = tmp_path / "guest.img"
    with pytest.raises(ValueError, match="dirty_mib"):
        build_image(out, dirty_mib=-5)
    assert list(tmp_path.iterdir()) == []


def test_edges_of_the_ranges_are_accepted() -> None:
    GuestParams(dirty_mib=0, rate_mib_s=0, random_mib=0, counter_interval_ms=1)
    GuestParams(dirty_mib=3070, rate_mib_s=1_000_000, random_mib=3070, counter_interval_ms=60_000)
    GuestParams(rate_mib_s=None)


# -- parameter block ----------------------------------------------------------------------


def test_encode_lays_out_the_block_the_guest_reads() -> None:
    fields = decode(GuestParams(dirty_mib=64, rate_mib_s=8, random_mib=512, text_mib=7).encode())
    version, dirty, rate, random, interval_ms, interval_ticks, tpp_int, tpp_frac, text = fields
    assert (version, dirty, rate, random, interval_ms, text) == (2, 64, 8, 512, 100, 7)
    assert interval_ticks == 119_318  # 100 ms of the 1.193182 MHz PIT
    # 8 MiB/s = 2048 pages/s: one page every 582.6 PIT ticks, as 32.32 fixed point
    assert tpp_int == 582
    assert abs((tpp_int + tpp_frac / 2**32) - 1_193_182 / 2048) < 1e-6


def test_rate_none_is_max_and_zero_is_off() -> None:
    assert decode(GuestParams(rate_mib_s=None).encode())[2] == 0xFFFF_FFFF
    assert decode(GuestParams(rate_mib_s=None).encode())[6:8] == (0, 0)
    assert decode(GuestParams(rate_mib_s=0).encode())[2] == 0
    assert decode(GuestParams(rate_mib_s=0).encode())[6:8] == (0, 0)


def test_highest_rate_still_has_a_nonzero_page_period() -> None:
    tpp = GuestParams(rate_mib_s=1_000_000).ticks_per_page
    assert 0 < tpp < 2**32


def test_patch_params_replaces_only_the_block() -> None:
    old = GuestParams().encode()
    blob = b"\x90" * 600 + old + b"tail"
    new = GuestParams(dirty_mib=7, rate_mib_s=3)
    patched = patch_params(blob, new)
    assert len(patched) == len(blob)
    assert patched[:600] == blob[:600] and patched.endswith(b"tail")
    assert decode(patched[600:])[1:3] == (7, 3)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"no block here", "exactly one parameter block"),
        (GuestParams().encode() * 2, "exactly one parameter block"),
        (MAGIC + b"\x01\x00", "truncated"),
        (MAGIC + struct.pack("<9I", 9, 0, 0, 0, 0, 0, 0, 0, 0), "version 9, builder expects 2"),
    ],
)
def test_patch_params_rejects_a_malformed_blob(blob: bytes, message: str) -> None:
    with pytest.raises(GuestBuildError, match=message):
        patch_params(blob, GuestParams())


# -- serial output ------------------------------------------------------------------------


def test_serial_counters_reads_counter_lines_only() -> None:
    text = (
        "ferry-guest ready ram_mib=255 dirty_mib=64 rate=max\r\n"
        "ferry-guest filled\r\n"
        "ferry-guest 1\r\nferry-guest 2\r\n"
        "noise ferry-guest 99\r\n"
        "ferry-guest 3\nferry-guest 4x\r\n"
        "ferry-guest 5\r\n"
    )
    assert serial_counters(text) == [1, 2, 3, 5]


def test_serial_counters_ignores_an_unfinished_last_line() -> None:
    assert serial_counters("ferry-guest 11\r\nferry-guest 1") == [11]
    assert serial_counters("ferry-guest 11\r\nferry-guest 12\r") == [11]
    assert serial_counters("") == []


# -- the real build (needs binutils, ~50 ms) ----------------------------------------------


@needs_binutils
def test_build_image_writes_a_bootable_padded_image(tmp_path: Path) -> None:
    out = build_image(tmp_path / "g.img", dirty_mib=64, rate_mib_s=8, random_mib=16)
    data = out.read_bytes()
    assert out == tmp_path / "g.img"
    assert len(data) == IMAGE_SIZE and len(data) % 512 == 0
    assert data[510:512] == b"\x55\xaa"
    at = data.find(MAGIC)
    assert at == 512, "the parameter block opens stage 2"
    assert decode(data[at:])[1:4] == (64, 8, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["g.img"], "no temp file left behind"


@needs_binutils
def test_build_image_replaces_an_existing_file_and_only_params_differ(tmp_path: Path) -> None:
    out = tmp_path / "g.img"
    out.write_bytes(b"old")
    a = build_image(out, dirty_mib=1).read_bytes()
    b = build_image(tmp_path / "h.img", dirty_mib=2).read_bytes()
    assert len(a) == IMAGE_SIZE
    assert [i for i in range(len(a)) if a[i] != b[i]] == [512 + 12]


@needs_binutils
def test_assembly_is_cached_per_process() -> None:
    guestimage._assemble.cache_clear()
    first = guestimage.assemble()
    assert guestimage.assemble() is first
    assert guestimage._assemble.cache_info().misses == 1


# -- CLI ----------------------------------------------------------------------------------


@needs_binutils
def test_cli_builds_with_max_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.img"
    assert main([str(out), "--dirty-mib", "8", "--rate", "max", "--interval-ms", "50"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    fields = decode(out.read_bytes()[512:])
    assert (fields[1], fields[2], fields[4]) == (8, 0xFFFF_FFFF, 50)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rate", "fast"], "not an integer MiB/s or 'max'"),
        (["--dirty-mib", "5000"], "dirty_mib must be an integer in 0..3070"),
    ],
)
def test_cli_rejects_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "x.img"), *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.img").exists()
