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
    Tick,
    broken_continuity,
    build_image,
    main,
    patch_params,
    serial_counters,
    serial_ticks,
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


B1, B2 = "00c0ffee12345678", "9abcdef001234567"


def test_serial_counters_reads_counter_lines_only() -> None:
    text = (
        f"ferry-guest ready ram_mib=255 dirty_mib=64 rate=max boot={B1}\r\n"
        "ferry-guest filled\r\n"
        f"ferry-guest 1 boot={B1}\r\nferry-guest 2 boot={B1}\r\n"
        f"noise ferry-guest 99 boot={B1}\r\n"
        f"ferry-guest 3 boot={B1}\nferry-guest 4x boot={B1}\r\n"
        f"ferry-guest 6 boot={B1[:-1]}\r\nferry-guest 7\r\n"
        f"ferry-guest 5 boot={B2}\r\n"
    )
    assert serial_counters(text) == [1, 2, 3, 5]
    assert serial_ticks(text) == [Tick(B1, 1), Tick(B1, 2), Tick(B1, 3), Tick(B2, 5)]


def test_serial_counters_ignores_an_unfinished_last_line() -> None:
    assert serial_counters(f"ferry-guest 11 boot={B1}\r\nferry-guest 1") == [11]
    assert serial_counters(f"ferry-guest 11 boot={B1}\r\nferry-guest 12 boot={B1}\r") == [11]
    assert serial_counters(f"ferry-guest 11 boot={B1}\r\nferry-guest 12 boot={B1[:8]}") \
        == [11]
    assert serial_counters("") == []


def test_continuity_holds_for_one_boot_counting_on_by_one() -> None:
    ticks = [Tick(B1, n) for n in range(1, 9)]
    assert broken_continuity(ticks) is None
    assert broken_continuity(ticks, since=Tick(B1, 5)) is None
    assert broken_continuity(ticks[:1]) is None


def test_a_reboot_breaks_continuity_even_where_the_counter_grows() -> None:
    # A rebooted guest in the shared append-mode log: a new boot id; the counter alone
    # (here made to grow on, as a counter-only check would accept) says nothing.
    ticks = [Tick(B1, 1), Tick(B1, 2), Tick(B2, 3), Tick(B2, 4)]
    why = broken_continuity(ticks, since=Tick(B1, 2))
    assert why is not None and f"boot id changed from {B1} to {B2} after count 2" in why
    restarted = [Tick(B1, 7), Tick(B1, 8), Tick(B2, 1), Tick(B2, 2)]
    assert "restarted" in (broken_continuity(restarted) or "")


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ([1, 2, 3, 2, 3], "count 2 followed 3"),  # two copies ran, or the source resumed
        ([1, 2, 4], "count 4 followed 2"),  # a stretch lost
        ([1, 2, 2], "count 2 followed 2"),
    ],
)
def test_a_counter_out_of_step_breaks_continuity(counts: list[int], message: str) -> None:
    assert message in (broken_continuity([Tick(B1, n) for n in counts]) or "")


def test_continuity_needs_ticks_and_a_since_among_them() -> None:
    assert broken_continuity([]) == "no counter line at all"
    why = broken_continuity([Tick(B1, 1)], since=Tick(B2, 1))
    assert why == f"tick 1 of boot {B2} is not in the log"


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


# -- the disk log ---------------------------------------------------------------------------


def test_a_log_record_carries_its_counter_its_complement_and_a_checksum() -> None:
    rec = guestimage.log_record(7)
    assert len(rec) == 512 and rec[:8] == b"FERRYLOG"
    assert struct.unpack_from("<II", rec, 8) == (7, 0xFFFF_FFF8)
    assert guestimage.parse_record(rec) == (b"FERRYLOG", 7)
    torn = rec[:256] + guestimage.log_record(8)[256:]
    assert guestimage.parse_record(torn) is None
    assert guestimage.parse_record(bytes(512)) is None


def test_the_disk_log_says_which_printed_counters_are_missing_and_which_slots_are_corrupt(
        ) -> None:
    n = 8
    sectors = [guestimage.log_record(12, guestimage.HEAD_MAGIC)]
    slots = {c % n: c for c in range(5, 13)}  # counters 5..12 in an 8-slot ring
    slots[10 % n] = 2  # counter 10's write was lost: its slot still holds counter 2
    for slot in range(n):
        sectors.append(guestimage.log_record(slots[slot]))
    sectors[1 + 3] = b"\xff" * 512  # slot 3 (counter 11) corrupt
    log = guestimage.parse_disk_log(b"".join(sectors), n)
    assert log.head == 12 and log.latest == 12
    assert log.corrupt == (3,)
    assert log.missing(12) == [10, 11]
    assert log.missing(20) == list(range(13, 21))  # printed, never on the disk


@needs_binutils
def test_a_logging_image_is_sparse_beyond_the_guest_and_carries_its_ring_size(
        tmp_path: Path) -> None:
    out = build_image(tmp_path / "log.img", log_sectors=4096, size=4 << 20)
    assert out.stat().st_size == 4 << 20
    data = out.read_bytes()
    at = data.find(guestimage.DISK_MAGIC)
    assert struct.unpack_from("<II", data, at + 8) == (1, 4096)
    with pytest.raises(ValueError, match="at least"):
        build_image(tmp_path / "small.img", log_sectors=4096, size=1 << 20)
