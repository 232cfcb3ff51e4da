"""Build a tiny bootable raw disk image whose guest dirties RAM at a known rate.

Migration tests need a guest whose memory behaviour is known and whose liveness
can be read from outside.  This guest (scripts/testbed/guest/guest.S) boots from the MBR
under SeaBIOS (IDE, AHCI or virtio-blk), switches to flat 32-bit protected
mode, optionally fills `random_mib` MiB at 2 MiB with incompressible bytes
and `text_mib` MiB after them with compressible ones (each page 5/8 hex text,
3/8 zeros: ~3:1 under zstd, like a server's text, logs and zero runs), then
forever dirties `dirty_mib` MiB, also from 2 MiB (so it overwrites random
pages), at `rate_mib_s` MiB/s and writes a counter line to COM1 every
`counter_interval_ms`.  The regions are clamped to the RAM the guest has (E820)
and to 3 GiB.  Serial output, CRLF-terminated::

    ferry-guest ready ram_mib=<R> dirty_mib=<D> rate=<X|max>
    ferry-guest filled                 (only if random_mib or text_mib > 0)
    ferry-guest 1
    ferry-guest 2 ...

R is the top of the usable RAM below 3 GiB in MiB; D is the dirty region after
clamping.  Dirtying writes a running count to the first word of each page in
turn; time comes from polling the PIT, and an idle guest halts between RTC
ticks (64 Hz) instead of spinning.  The assembled blob is cached per process;
parameters are patched into its parameter block, so one assembly serves every
parameter set.  Under a KVM that emulates non-paged guest code (PVM does) the
guest runs at ~1 MIPS: boot takes seconds and large random fills take minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent / "guest"
SOURCE = GUEST_DIR / "guest.S"
LINKER_SCRIPT = GUEST_DIR / "guest.ld"

SECTOR = 512
IMAGE_SIZE = 1 << 20  # 2048 sectors: a plain 2/16/63 CHS geometry for SeaBIOS
PIT_HZ = 1_193_182
PAGES_PER_MIB = 256
RATE_MAX = 0xFFFF_FFFF  # the guest's "as fast as it can"
MAX_REGION_MIB = 3070  # regions live in [2 MiB, 3 GiB): below any PCI hole
MAX_RATE_MIB_S = 1_000_000
MAX_INTERVAL_MS = 60_000  # the interval must fit 32 bits of PIT ticks

MAGIC = b"FERRYPRM"
PARAMS_VERSION = 2
# magic, version, dirty_mib, rate, random_mib, interval_ms, interval_ticks,
# PIT ticks per dirtied page as 32.32 fixed point (integer part, fraction), text_mib.
_PARAMS = struct.Struct("<8s9I")

_COUNTER_RE = re.compile(r"^ferry-guest (\d+)\r?\n", re.MULTILINE)


class GuestBuildError(RuntimeError):
    """The assembler toolchain is missing or failed, or its output is malformed."""


@dataclass(frozen=True)
class GuestParams:
    """Validated guest parameters; `encode()` gives the guest's parameter block."""

    dirty_mib: int = 0
    rate_mib_s: int | None = None
    random_mib: int = 0
    counter_interval_ms: int = 100
    text_mib: int = 0

    def __post_init__(self) -> None:
        _check_int("dirty_mib", self.dirty_mib, 0, MAX_REGION_MIB)
        _check_int("random_mib", self.random_mib, 0, MAX_REGION_MIB)
        _check_int("text_mib", self.text_mib, 0, MAX_REGION_MIB - self.random_mib,
                   "(with random_mib)")
        _check_int("counter_interval_ms", self.counter_interval_ms, 1, MAX_INTERVAL_MS)
        if self.rate_mib_s is not None:
            _check_int("rate_mib_s", self.rate_mib_s, 0, MAX_RATE_MIB_S, "or None for max")

    @property
    def interval_ticks(self) -> int:
        """PIT ticks between two counter lines (the guest has no divide-friendly clock)."""
        return (self.counter_interval_ms * PIT_HZ + 500) // 1000

    @property
    def ticks_per_page(self) -> int:
        """PIT ticks per dirtied page, 32.32 fixed point; 0 when unlimited or off."""
        if not self.rate_mib_s:
            return 0
        pages_per_s = self.rate_mib_s * PAGES_PER_MIB
        return ((PIT_HZ << 32) + pages_per_s // 2) // pages_per_s

    def encode(self) -> bytes:
        """The parameter block exactly as the guest reads it."""
        rate = RATE_MAX if self.rate_mib_s is None else self.rate_mib_s
        tpp = self.ticks_per_page
        return _PARAMS.pack(
            MAGIC,
            PARAMS_VERSION,
            self.dirty_mib,
            rate,
            self.random_mib,
            self.counter_interval_ms,
            self.interval_ticks,
            tpp >> 32,
            tpp & 0xFFFF_FFFF,
            self.text_mib,
        )


def _check_int(name: str, value: object, low: int, high: int, extra: str = "") -> None:
    # bool is an int subclass, but True MiB is a bug in the caller, not a size.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        hint = f" {extra}" if extra else ""
        raise ValueError(f"{name} must be an integer in {low}..{high}{hint}, got {value!r}")


def patch_params(blob: bytes, params: GuestParams) -> bytes:
    """Return `blob` with its parameter block replaced by `params`."""
    at = blob.find(MAGIC)
    if at < 0 or blob.find(MAGIC, at + 1) >= 0:
        raise GuestBuildError("guest blob must contain exactly one parameter block")
    if at + _PARAMS.size > len(blob):
        raise GuestBuildError("guest parameter block is truncated")
    version = _PARAMS.unpack_from(blob, at)[1]
    if version != PARAMS_VERSION:
        raise GuestBuildError(
            f"guest parameter block is version {version}, builder expects {PARAMS_VERSION}"
        )
    return blob[:at] + params.encode() + blob[at + _PARAMS.size :]


def assemble() -> bytes:
    """The guest as a flat binary (MBR + stage 2), assembled once per source version."""
    digest = hashlib.sha256(SOURCE.read_bytes() + LINKER_SCRIPT.read_bytes()).hexdigest()
    return _assemble(digest)


@functools.lru_cache(maxsize=4)
def _assemble(digest: str) -> bytes:
    del digest  # only the cache key: a new digest means the sources changed
    with tempfile.TemporaryDirectory(prefix="ferry-guest-") as tmp:
        obj, elf, binary = (str(Path(tmp) / n) for n in ("guest.o", "guest.elf", "guest.bin"))
        for cmd in (
            [_tool("as"), "--32", "-o", obj, str(SOURCE)],
            [_tool("ld"), "-m", "elf_i386", "-T", str(LINKER_SCRIPT), "-o", elf, obj],
            [_tool("objcopy"), "-O", "binary", elf, binary],
        ):
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise GuestBuildError(f"{Path(cmd[0]).name} failed: {res.stderr.strip()}")
        blob = Path(binary).read_bytes()
    if len(blob) < SECTOR or blob[510:512] != b"\x55\xaa":
        raise GuestBuildError("assembled guest has no MBR boot signature")
    return blob


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GuestBuildError(f"GNU binutils needed to build the guest: {name!r} not found")
    return path


def render_image(params: GuestParams) -> bytes:
    """The whole raw disk image for `params`, padded to IMAGE_SIZE."""
    blob = patch_params(assemble(), params)
    if len(blob) > IMAGE_SIZE:
        raise GuestBuildError(f"guest is {len(blob)} bytes, larger than the image")
    return blob + bytes(IMAGE_SIZE - len(blob))


def build_image(
    out: Path,
    *,
    dirty_mib: int = 0,
    rate_mib_s: int | None = None,
    random_mib: int = 0,
    counter_interval_ms: int = 100,
    text_mib: int = 0,
) -> Path:
    """Write the guest image to `out` atomically and return `out`.

    `rate_mib_s=None` dirties as fast as the guest can, 0 not at all.  A reader
    never sees a half-written image: it goes to a temp file that is renamed.
    """
    params = GuestParams(dirty_mib, rate_mib_s, random_mib, counter_interval_ms, text_mib)
    data = render_image(params)
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


def serial_counters(text: str) -> list[int]:
    """Counter values from the guest's serial output, in order.

    Only complete lines count: a trailing "ferry-guest 12" may still become 123.
    """
    return [int(m.group(1)) for m in _COUNTER_RE.finditer(text)]


def _rate_arg(text: str) -> int | None:
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer MiB/s or 'max': {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build one image and print its path."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.testbed.guestimage",
        description="Build ferry's test guest: a raw disk image that dirties RAM at a set rate.",
    )
    parser.add_argument("out", type=Path, help="image file to write (raw)")
    parser.add_argument("--dirty-mib", type=int, default=0, help="MiB to keep dirtying")
    parser.add_argument(
        "--rate",
        type=_rate_arg,
        default=None,
        metavar="MIBS|max",
        help="dirtying rate in MiB/s, 0 = none (default: max)",
    )
    parser.add_argument(
        "--random-mib", type=int, default=0, help="MiB filled once with incompressible bytes"
    )
    parser.add_argument(
        "--text-mib", type=int, default=0, help="MiB filled once with text and zeros (~3:1)"
    )
    parser.add_argument("--interval-ms", type=int, default=100, help="counter line period")
    args = parser.parse_args(argv)
    try:
        path = build_image(
            args.out,
            dirty_mib=args.dirty_mib,
            rate_mib_s=args.rate,
            random_mib=args.random_mib,
            counter_interval_ms=args.interval_ms,
            text_mib=args.text_mib,
        )
    except (ValueError, GuestBuildError, OSError) as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
