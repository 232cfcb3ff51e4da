"""The save image file format: the header and the compressor tables (the jobs that write
and read images are workers/image_jobs.py).  Pure: no I/O beyond a file object handed
in, so every rule has a unit test.

An image is a fixed header, the domain XML, zero padding, then QEMU's migration
stream as the compressor wrote it.  All integers are little-endian::

    off len  field
      0   8  magic        b"FERRYIMG"
      8   4  version      1
     12   4  flags        bit 0: the guest was running (restore starts its CPUs)
     16  16  compression  ASCII name, NUL padded: raw gzip bzip2 xz lzop zstd
     32   4  xml_len      bytes of domain XML (UTF-8) right after the fixed header
     36   4  data_offset  where the stream starts: 64 + xml_len rounded up to 4096
     40   8  data_len     bytes of stream; 0 while the save still runs
     48   4  crc32        of these 64 bytes with this field zero, then of the XML
     52  12  reserved     zero
     64      the XML, then zeros up to data_offset

The stream starts on a 4096-byte boundary so it can be written with O_DIRECT
(`--bypass-cache`).  The save writes the header first with data_len 0 and
rewrites it with the real length before the fsync and the rename, so an image
whose writer died says so, and a truncated one is caught before QEMU starts.

Compressors are argument lists for programs ferry spawns itself (never a
shell); `raw` has none: QEMU writes and reads the image file directly.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from workers.errors import FerryError, InvalidInputError

MAGIC = b"FERRYIMG"
VERSION = 1
ALIGN = 4096
MAX_XML_BYTES = 1024 * 1024
FLAG_WAS_RUNNING = 1
_FIXED = struct.Struct("<8sII16sIIQI12s")
FIXED_SIZE = _FIXED.size  # 64


class ImageError(InvalidInputError):
    """The file is not a complete, intact ferry image; nothing was started."""


class CompressorError(FerryError):
    """A compressor or decompressor ferry spawned failed."""


class ImageIOError(FerryError):
    """Reading or writing an image file failed: disk full, permissions, I/O error."""


class SaveFlags(enum.IntFlag):
    """libvirt's virDomainSaveRestoreFlags (names and bit values)."""

    BYPASS_CACHE = 1
    RUNNING = 2
    PAUSED = 4


class DumpFlags(enum.IntFlag):
    """libvirt's virDomainCoreDumpFlags that ferry supports."""

    LIVE = 2
    MEMORY_ONLY = 16


DUMP_FORMATS = ("elf", "kdump-zlib", "kdump-lzo", "kdump-snappy")


# -- compressors ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Compressor:
    """How to write and read one compression: argv lists, or None for QEMU's own fd."""

    name: str
    compress: tuple[str, ...] | None
    decompress: tuple[str, ...] | None

    @property
    def program(self) -> str | None:
        return self.compress[0] if self.compress else None


# Program defaults as libvirt uses them (`prog -c`, `prog -dc`), quiet; xz and zstd
# use every core (-T0): the output is the same format, readable by any xz/zstd.
COMPRESSORS: dict[str, Compressor] = {c.name: c for c in (
    Compressor("raw", None, None),
    Compressor("gzip", ("gzip", "-c"), ("gzip", "-dc")),
    Compressor("bzip2", ("bzip2", "-c"), ("bzip2", "-dc")),
    Compressor("xz", ("xz", "-c", "-T0"), ("xz", "-dc")),
    Compressor("lzop", ("lzop", "-c"), ("lzop", "-dc")),
    Compressor("zstd", ("zstd", "-q", "-c", "-T0"), ("zstd", "-q", "-dc")),
)}


def compressor(name: str) -> Compressor:
    try:
        return COMPRESSORS[name]
    except KeyError:
        raise InvalidInputError(f"unknown compression '{name}' (one of "
                                f"{', '.join(COMPRESSORS)})") from None


def compress_argv(name: str, extra: Sequence[str] = ()) -> list[str] | None:
    """The compressor's argv (stdin: QEMU's stream, stdout: the image), None for raw."""
    argv = compressor(name).compress
    return None if argv is None else [*argv, *extra]


def decompress_argv(name: str) -> list[str] | None:
    """The decompressor's argv (stdin: the image at data_offset), None for raw."""
    argv = compressor(name).decompress
    return None if argv is None else list(argv)


def bypass_cache_argv() -> list[str]:
    """A writer between the stream and the image that bypasses the page cache.

    GNU dd sets O_DIRECT on its stdout (the image, at an aligned offset) and
    writes whole MiB blocks; it drops O_DIRECT itself for the last partial one.
    """
    return ["dd", "oflag=direct", "iflag=fullblock", "bs=1M", "status=none"]


# -- the header ----------------------------------------------------------------------------
def align_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class ImageHeader:
    xml: str
    compression: str
    was_running: bool
    data_len: int = 0
    version: int = VERSION

    @property
    def xml_bytes(self) -> bytes:
        return self.xml.encode("utf-8")

    @property
    def data_offset(self) -> int:
        return align_up(FIXED_SIZE + len(self.xml_bytes))

    @property
    def complete(self) -> bool:
        return self.data_len > 0


def _fixed(h: ImageHeader, xml: bytes, crc: int) -> bytes:
    name = h.compression.encode("ascii")
    if len(name) > 16:
        raise InvalidInputError(f"compression name too long: {h.compression!r}")
    flags = FLAG_WAS_RUNNING if h.was_running else 0
    return _FIXED.pack(MAGIC, h.version, flags, name, len(xml), align_up(FIXED_SIZE + len(xml)),
                       h.data_len, crc, bytes(12))


def _crc(fixed_without_crc: bytes, xml: bytes) -> int:
    return zlib.crc32(xml, zlib.crc32(fixed_without_crc)) & 0xFFFFFFFF


def encode_header(h: ImageHeader) -> bytes:
    """The header with its padding: exactly `h.data_offset` bytes.

    The compression name is not checked here, so tests can write images that
    claim one ferry does not know.
    """
    xml = h.xml_bytes
    if len(xml) > MAX_XML_BYTES:
        raise InvalidInputError(f"domain XML is larger than {MAX_XML_BYTES} bytes")
    fixed = _fixed(h, xml, _crc(_fixed(h, xml, 0), xml))
    return (fixed + xml).ljust(h.data_offset, b"\0")


def read_header(f: BinaryIO, file_size: int) -> ImageHeader:
    """Read and check the header of an image of `file_size` bytes, positioned at 0.

    Every problem is an ImageError with one clear line: not an image, another
    version, corrupted, unknown compression, incomplete or truncated.
    """
    raw = f.read(FIXED_SIZE)
    if len(raw) < len(MAGIC) or raw[:len(MAGIC)] != MAGIC:
        raise ImageError("not a ferry save image (bad magic)")
    if len(raw) < FIXED_SIZE:
        raise ImageError(f"image is truncated: {file_size} bytes, shorter than its header")
    _, version, flags, name, xml_len, data_offset, data_len, crc, _ = _FIXED.unpack(raw)
    if version != VERSION:
        raise ImageError(f"unsupported image version {version} (this ferry reads {VERSION})")
    if xml_len > MAX_XML_BYTES or data_offset != align_up(FIXED_SIZE + xml_len):
        raise ImageError("image header is corrupted (impossible XML length)")
    xml = f.read(xml_len)
    if len(xml) < xml_len:
        raise ImageError(f"image is truncated: {file_size} bytes, shorter than its header")
    zeroed = raw[:48] + b"\0\0\0\0" + raw[52:]
    if _crc(zeroed, xml) != crc:
        raise ImageError("image header is corrupted (checksum mismatch)")
    return _checked(name, flags, xml, data_offset, data_len, file_size)


def _checked(name: bytes, flags: int, xml: bytes, data_offset: int, data_len: int,
             file_size: int) -> ImageHeader:
    text = name.rstrip(b"\0").decode("ascii", errors="replace")
    if text not in COMPRESSORS:
        raise ImageError(f"image header names an unknown compression '{text}' "
                         f"(one of {', '.join(COMPRESSORS)})")
    if data_len == 0:
        raise ImageError("image is incomplete: the save that wrote it did not finish")
    if file_size < data_offset + data_len:
        raise ImageError(f"image is truncated: {file_size} bytes, its header says "
                         f"{data_offset + data_len}")
    try:
        decoded = xml.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageError("image header is corrupted (domain XML is not UTF-8)") from None
    return ImageHeader(decoded, text, bool(flags & FLAG_WAS_RUNNING), data_len)


def starts_running(h: ImageHeader, running: bool, paused: bool) -> bool:
    """Whether a restore starts the CPUs: as asked, else as saved."""
    check_run_flags(running, paused)
    return running or (h.was_running and not paused)


def check_run_flags(running: bool, paused: bool) -> None:
    if running and paused:
        raise InvalidInputError("--running and --paused are mutually exclusive")


def dump_request(memory_only: bool, fmt: str) -> dict[str, object]:
    """dump-guest-memory's arguments (but the protocol) for a dump request.

    Without --memory-only the ELF core carries the guest's virtual mappings
    (paging: what crash and gdb read); --memory-only is guest-physical memory
    in any format, as libvirt's --memory-only.  kdump formats need it (QEMU
    cannot page-walk into a compressed kdump).
    """
    if fmt not in DUMP_FORMATS:
        raise InvalidInputError(f"unknown dump format '{fmt}' (one of {', '.join(DUMP_FORMATS)})")
    if fmt != "elf" and not memory_only:
        raise InvalidInputError(f"--format {fmt} needs --memory-only")
    return {"paging": not memory_only, "format": fmt, "detach": True}
