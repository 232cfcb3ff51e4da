"""The save image header and the compressor tables (workers/image_format.py)."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from workers import image_format
from workers.errors import InvalidInputError
from workers.image_format import (
    ALIGN,
    COMPRESSORS,
    FIXED_SIZE,
    ImageError,
    ImageHeader,
    encode_header,
    read_header,
)

XML = "<domain type='qemu'><name>g</name><uuid>0b5a6c1e-1111-2222-3333-444455556666</uuid>" \
      "<memory unit='MiB'>64</memory></domain>\n"
STREAM = os.urandom(10_000)


def _image(header: ImageHeader, stream: bytes = STREAM) -> bytes:
    return encode_header(header) + stream


def _read(data: bytes) -> ImageHeader:
    return read_header(io.BytesIO(data), len(data))


def _complete(**kw: object) -> ImageHeader:
    fields: dict[str, object] = {"xml": XML, "compression": "zstd", "was_running": True,
                                 "data_len": len(STREAM)}
    fields.update(kw)
    return ImageHeader(**fields)  # type: ignore[arg-type]


def test_header_round_trip_and_the_stream_starts_aligned() -> None:
    h = _complete(xml=XML + "<!-- é -->")
    data = _image(h)
    assert _read(data) == h
    assert len(encode_header(h)) == h.data_offset and h.data_offset % ALIGN == 0
    assert data[h.data_offset:] == STREAM
    assert data[:8] == b"FERRYIMG" and struct.unpack_from("<I", data, 8)[0] == 1


def test_was_running_false_and_every_compression_round_trip() -> None:
    for name in COMPRESSORS:
        h = _complete(compression=name, was_running=False)
        assert _read(_image(h)) == h


def test_a_large_xml_pushes_the_stream_to_the_next_block() -> None:
    h = _complete(xml=XML + " " * ALIGN)
    assert h.data_offset == 2 * ALIGN
    assert _read(_image(h)).xml == h.xml


@pytest.mark.parametrize("data, message", [
    (b"", "bad magic"),
    (b"FERRY", "bad magic"),
    (b"QEVM\0\0\0\3" + bytes(100), "bad magic"),
    (b"FERRYIMG" + bytes(10), "truncated"),
])
def test_not_an_image(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        _read(data)


def test_an_unknown_version_is_refused() -> None:
    data = bytearray(_image(_complete()))
    struct.pack_into("<I", data, 8, 2)
    with pytest.raises(ImageError, match="unsupported image version 2"):
        _read(bytes(data))


def test_a_flipped_bit_in_the_xml_or_the_fields_is_caught() -> None:
    good = _image(_complete())
    for offset in (FIXED_SIZE + 3, 12, 40):  # the XML, the flags, data_len
        bad = bytearray(good)
        bad[offset] ^= 0x04
        with pytest.raises(ImageError, match="checksum mismatch"):
            _read(bytes(bad))


def test_an_impossible_xml_length_is_corruption() -> None:
    data = bytearray(_image(_complete()))
    struct.pack_into("<I", data, 32, 3 * 1024 * 1024)
    with pytest.raises(ImageError, match="impossible XML length"):
        _read(bytes(data))


def test_an_unknown_compression_is_named() -> None:
    with pytest.raises(ImageError, match="unknown compression 'lz4'"):
        _read(_image(_complete(compression="lz4")))


def test_an_incomplete_image_says_the_save_did_not_finish() -> None:
    with pytest.raises(ImageError, match="incomplete"):
        _read(_image(_complete(data_len=0)))


def test_a_truncated_stream_is_caught_before_qemu_starts() -> None:
    data = _image(_complete())
    with pytest.raises(ImageError, match=f"image is truncated: {len(data) - 1} bytes"):
        _read(data[:-1])
    with pytest.raises(ImageError, match="truncated"):
        _read(data[:FIXED_SIZE + 5])


def test_xml_that_is_not_utf8_is_corruption() -> None:
    h = _complete()
    xml = b"<domain>\xff</domain>"
    fixed = bytearray(image_format._FIXED.pack(image_format.MAGIC, 1, 1, b"zstd", len(xml),
                                         image_format.align_up(FIXED_SIZE + len(xml)), len(STREAM),
                                         0, bytes(12)))
    crc = zlib.crc32(xml, zlib.crc32(bytes(fixed)))
    struct.pack_into("<I", fixed, 48, crc)
    data = (bytes(fixed) + xml).ljust(h.data_offset, b"\0") + STREAM
    with pytest.raises(ImageError, match="not UTF-8"):
        _read(data)


def test_an_xml_larger_than_the_limit_is_refused_when_writing() -> None:
    with pytest.raises(InvalidInputError, match="larger than"):
        encode_header(_complete(xml="x" * (image_format.MAX_XML_BYTES + 1)))


def test_compressor_tables_are_argument_lists_for_known_programs() -> None:
    assert COMPRESSORS["raw"].compress is None and image_format.compress_argv("raw") is None
    assert image_format.decompress_argv("raw") is None
    for name, comp in COMPRESSORS.items():
        if name == "raw":
            continue
        assert comp.program == name
        compress, decompress = image_format.compress_argv(name), image_format.decompress_argv(name)
        assert compress is not None and decompress is not None
        assert compress[0] == decompress[0] == name and "-c" in compress
        assert "-dc" in decompress
        assert not any(set(arg) & set("|;&$<>`' ") for arg in compress + decompress)
    assert image_format.compress_argv("gzip", ["-x"]) == ["gzip", "-c", "-x"]
    with pytest.raises(InvalidInputError, match="unknown compression 'lz4'"):
        image_format.compress_argv("lz4")


@pytest.mark.parametrize("name", [n for n in COMPRESSORS if n != "raw"])
def test_each_compressor_round_trips_through_its_argv(name: str) -> None:
    compress, decompress = image_format.compress_argv(name), image_format.decompress_argv(name)
    assert compress is not None and decompress is not None
    if shutil.which(compress[0]) is None:
        pytest.skip(f"{compress[0]} is not installed")
    data = os.urandom(100_000) + bytes(400_000)
    packed = subprocess.run(compress, input=data, capture_output=True, check=True).stdout
    assert len(packed) < len(data)
    assert subprocess.run(decompress, input=packed, capture_output=True,
                          check=True).stdout == data


def test_bypass_cache_writer_appends_at_an_aligned_offset(tmp_path: Path) -> None:
    path = tmp_path / "direct"
    with open(path, "wb") as f:
        f.write(encode_header(_complete()))
        f.flush()
        data = os.urandom(3 * 1024 * 1024 + 123)  # a final partial block
        res = subprocess.run(image_format.bypass_cache_argv(), input=data, stdout=f,
                             stderr=subprocess.PIPE)
    if res.returncode != 0 and b"Invalid argument" in res.stderr:
        pytest.skip("this file system has no O_DIRECT")
    assert res.returncode == 0, res.stderr
    assert path.read_bytes()[ALIGN:] == data


@pytest.mark.parametrize("running, paused, was_running, starts", [
    (False, False, True, True), (False, False, False, False), (True, False, False, True),
    (False, True, True, False),
])
def test_restore_starts_as_asked_else_as_saved(running: bool, paused: bool, was_running: bool,
                                                starts: bool) -> None:
    header = _complete(was_running=was_running)
    assert image_format.starts_running(header, running, paused) is starts


def test_running_and_paused_together_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="mutually exclusive"):
        image_format.check_run_flags(True, True)


def test_dump_requests() -> None:
    assert image_format.dump_request(False, "elf") == {"paging": True, "format": "elf",
                                                       "detach": True}
    assert image_format.dump_request(True, "kdump-zlib")["paging"] is False
    with pytest.raises(InvalidInputError, match="needs --memory-only"):
        image_format.dump_request(False, "kdump-lzo")
    with pytest.raises(InvalidInputError, match="unknown dump format 'vmcore'"):
        image_format.dump_request(True, "vmcore")
