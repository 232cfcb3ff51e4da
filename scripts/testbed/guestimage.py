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

    ferry-guest ready ram_mib=<R> dirty_mib=<D> rate=<X|max> boot=<B>
    ferry-guest filled                 (only if random_mib or text_mib > 0)
    ferry-guest 1 boot=<B>
    ferry-guest 2 boot=<B> ...

R is the top of the usable RAM below 3 GiB in MiB; D is the dirty region after
clamping.  With `log_sectors` > 0 the guest also writes every counter to its disk
before it prints it (IDE primary master, so the disk must be `hda` on bus ide): a
record at LBA 2049 + N mod log_sectors and a head sector at LBA 2048 naming the
latest N, each with a checksum, so `read_disk_log` can prove that every counter the
guest printed is on a disk (none lost by a storage copy) and that none is corrupt.
Dirtying writes a running count to the first word of each page in
turn; time comes from polling the PIT, and an idle guest halts between RTC
ticks (64 Hz) instead of spinning.  The assembled blob is cached per process;
parameters are patched into its parameter block, so one assembly serves every
parameter set.  Under a KVM that emulates non-paged guest code (PVM does) the
guest runs at ~1 MIPS: boot takes seconds and large random fills take minutes.

B is the boot identifier: 16 hex digits taken once per boot, the TSC at start
(in cycles: it differs from boot to boot) xor RDRAND where the CPU has it and announces
no hypervisor (a KVM that emulates the guest's code, as PVM does, cannot emulate
RDRAND).  It lives in guest RAM: a migrated or restored guest prints the same B
and its count goes on by one; a rebooted guest, in the same append-mode log,
prints a new B and counts from 1 again.  `broken_continuity` tells the two apart.
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

_TICK_RE = re.compile(r"^ferry-guest (\d+) boot=([0-9a-f]{16})\r?\n", re.MULTILINE)


@dataclass(frozen=True)
class Tick:
    """One counter line: the boot it belongs to and its count."""

    boot: str
    count: int

DISK_MAGIC = b"FERRYDSK"
DISK_PARAMS_VERSION = 1
_DISK_PARAMS = struct.Struct("<8sII")  # magic, version, log_sectors
LOG_LBA = 2048  # the head sector; records from LOG_LBA + 1
LOG_MAGIC, HEAD_MAGIC = b"FERRYLOG", b"FERRYHED"
MAX_LOG_SECTORS = 1 << 20
_GOLDEN = 0x9E3779B1


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


def patch_disk_params(blob: bytes, log_sectors: int) -> bytes:
    """Return `blob` with its disk parameter block set to `log_sectors`."""
    _check_int("log_sectors", log_sectors, 0, MAX_LOG_SECTORS)
    at = blob.find(DISK_MAGIC)
    if at < 0 or blob.find(DISK_MAGIC, at + 1) >= 0:
        raise GuestBuildError("guest blob must contain exactly one disk parameter block")
    block = _DISK_PARAMS.pack(DISK_MAGIC, DISK_PARAMS_VERSION, log_sectors)
    return blob[:at] + block + blob[at + _DISK_PARAMS.size:]


def log_record(counter: int, magic: bytes = LOG_MAGIC) -> bytes:
    """The sector the guest writes for `counter` (its make_record, in Python)."""
    words = [*struct.unpack("<2I", magic), counter, counter ^ 0xFFFF_FFFF]
    base = (counter * _GOLDEN) & 0xFFFF_FFFF
    words += [(base + i) & 0xFFFF_FFFF for i in range(4, 127)]
    check = 0
    for w in words:
        check ^= w
    return struct.pack("<128I", *words, check)


def parse_record(sector: bytes) -> tuple[bytes, int] | None:
    """(magic, counter) of an intact record or head sector; None for anything else."""
    if len(sector) != SECTOR or sector[:8] not in (LOG_MAGIC, HEAD_MAGIC):
        return None
    counter = struct.unpack_from("<I", sector, 8)[0]
    return (sector[:8], counter) if sector == log_record(counter, sector[:8]) else None


@dataclass(frozen=True)
class DiskLog:
    """What a guest's disk log holds: the head's counter, each slot's counter, and the
    slots that hold something that is not an intact record (torn or corrupt)."""

    log_sectors: int
    head: int | None
    slots: dict[int, int]
    corrupt: tuple[int, ...]

    @property
    def latest(self) -> int:
        return max(self.slots.values(), default=0)

    def missing(self, upto: int) -> list[int]:
        """Counters <= `upto` (within the ring's reach) whose record is not on the disk."""
        first = max(1, upto - self.log_sectors + 1)
        return [c for c in range(first, upto + 1)
                if self.slots.get(c % self.log_sectors, -1) < c]


def parse_disk_log(data: bytes, log_sectors: int) -> DiskLog:
    """The log from the bytes of the disk from LBA LOG_LBA on."""
    head = parse_record(data[:SECTOR])
    slots: dict[int, int] = {}
    corrupt = []
    for slot in range(log_sectors):
        sector = data[(slot + 1) * SECTOR:(slot + 2) * SECTOR]
        rec = parse_record(sector)
        if rec is not None and rec[0] == LOG_MAGIC and rec[1] % log_sectors == slot:
            slots[slot] = rec[1]
        elif sector.strip(b"\0"):
            corrupt.append(slot)
    return DiskLog(log_sectors, head[1] if head and head[0] == HEAD_MAGIC else None, slots,
                   tuple(corrupt))


def read_disk_log(image: Path, fmt: str, log_sectors: int) -> DiskLog:
    """The log of an image file (raw or qcow2; read shared, even while a QEMU has it)."""
    with tempfile.TemporaryDirectory(prefix="ferry-log-") as tmp:
        out = Path(tmp) / "log.raw"
        subprocess.run(["qemu-img", "dd", "-U", "-f", fmt, "-O", "raw", f"bs={SECTOR}",
                        f"skip={LOG_LBA}", f"count={log_sectors + 1}", f"if={image}",
                        f"of={out}"], check=True, capture_output=True)
        return parse_disk_log(out.read_bytes(), log_sectors)


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
    log_sectors: int = 0,
    size: int = IMAGE_SIZE,
    text_mib: int = 0,
) -> Path:
    """Write the guest image (raw, `size` bytes, sparse beyond the guest) to `out`
    atomically and return `out`.

    `rate_mib_s=None` dirties as fast as the guest can, 0 not at all; `log_sectors`
    > 0 makes the guest log its counters to the disk (which must then hold them).
    A reader never sees a half-written image: it goes to a temp file that is renamed.
    """
    params = GuestParams(dirty_mib, rate_mib_s, random_mib, counter_interval_ms, text_mib)
    data = render_image(params)
    if log_sectors:
        data = patch_disk_params(data, log_sectors)
    need = (LOG_LBA + 1 + log_sectors) * SECTOR if log_sectors else IMAGE_SIZE
    if size < need or size % SECTOR:
        raise ValueError(f"size must be a multiple of {SECTOR} and at least {need}")
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


def serial_ticks(text: str) -> list[Tick]:
    """Counter lines from the guest's serial output, in order.

    Only complete lines count: a trailing "ferry-guest 12" may still become 123.
    """
    return [Tick(m.group(2), int(m.group(1))) for m in _TICK_RE.finditer(text)]


def serial_counters(text: str) -> list[int]:
    """Counter values from the guest's serial output, in order (boot ids dropped)."""
    return [t.count for t in serial_ticks(text)]


def broken_continuity(ticks: Sequence[Tick], since: Tick | None = None) -> str | None:
    """Why `ticks` do not show one guest running on from `since`, or None if they do.

    From `since` (a tick seen earlier; the first tick when None) on, every tick must
    carry `since`'s boot id and count one above the tick before it: a reboot shows
    as a new boot id, a second copy of the guest or a lost stretch as a count out of
    step.  `since` must be among `ticks`.
    """
    if not ticks:
        return "no counter line at all"
    start = ticks[0] if since is None else since
    try:
        at = list(ticks).index(start)
    except ValueError:
        return f"tick {start.count} of boot {start.boot} is not in the log"
    prev = start
    for tick in ticks[at + 1 :]:
        if tick.boot != start.boot:
            return (f"boot id changed from {start.boot} to {tick.boot} after count "
                    f"{prev.count}: the guest was restarted")
        if tick.count != prev.count + 1:
            return f"count {tick.count} followed {prev.count}: not one guest counting on"
        prev = tick
    return None


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
    parser.add_argument("--log-sectors", type=int, default=0,
                        help="log each counter to the disk in a ring of this many sectors")
    parser.add_argument("--size-mib", type=int, default=0, help="image size (default: fit)")
    args = parser.parse_args(argv)
    try:
        path = build_image(
            args.out,
            dirty_mib=args.dirty_mib,
            rate_mib_s=args.rate,
            random_mib=args.random_mib,
            counter_interval_ms=args.interval_ms,
            log_sectors=args.log_sectors,
            size=args.size_mib << 20 if args.size_mib else
            max(IMAGE_SIZE, -(-(LOG_LBA + 1 + args.log_sectors) * SECTOR // (1 << 20)) << 20),
            text_mib=args.text_mib,
        )
    except (ValueError, GuestBuildError, OSError) as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
