"""`python -m scripts.bench.images`: ferry's save and restore per compressor against the floor.

One TCG guest of 1 GiB whose first 512 MiB are random (the rest stays zero)
runs on a local ferry host (redis + host alpha in a temporary root); a twin
runs in a bare QEMU driven over QMP.  Per compressor and run, interleaved:

- ferry: `save` (pause, header, QEMU -> fd -> compressor -> temp file, fsync,
  rename, QEMU gone) and `restore` (header, QEMU -incoming defer, file ->
  decompressor -> fd, cont), each timed around the client call;
- floor: the twin does the same with nothing but QMP and QEMU's `exec:`
  migration through the same compressor argv in a shell: `stop`,
  `migrate exec:ARGV > FILE`, fsync, `quit`; then a new QEMU, `migrate-incoming
  exec:ARGV < FILE`, `cont`.  raw is `cat` on the floor (ferry hands QEMU the
  file itself).

Writes the Markdown table to scripts/bench/IMAGES.md (and prints it).  Every
process it starts is stopped by pid, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from qemu.qmp import EventListener, QMPClient

from config.settings import load
from scripts.bench.migration import wait_filled
from scripts.bench.report import machine
from scripts.testbed.guestimage import build_image
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import Stack, searchable, stop_pid
from tasks.client import Client
from workers.domain_xml import parse_domain_xml
from workers.image_format import COMPRESSORS, compress_argv, decompress_argv
from workers.migration.params import UNLIMITED_BANDWIDTH_BYTES
from workers.process import listening_socket
from workers.qemu_argv import build_qemu_argv

BENCH_DIR = Path(__file__).resolve().parent
TIMEOUT_S = 3600.0
EVENTS = {"capabilities": [{"capability": "events", "state": True}]}
SLOW = ("bzip2", "xz")


@dataclass
class Sample:
    save_s: float
    restore_s: float
    size: int


@dataclass
class FloorTwin:
    """The guest in a bare QEMU: saved to and restored from a file by QMP alone."""

    xml: str
    workdir: Path
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    popen: subprocess.Popen[bytes] | None = None
    qmp: QMPClient | None = None
    events: EventListener | None = None
    count: int = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, TIMEOUT_S))

    async def launch(self, incoming: str | None = None) -> None:
        self.count += 1
        d = parse_domain_xml(self.xml)
        sock_path = self.workdir / f"floor-{self.count}.qmp"
        sock = listening_socket(sock_path)
        try:
            argv = build_qemu_argv(d, qmp_fd=sock.fileno(), kvm=False, incoming=incoming,
                                   pidfile=str(self.workdir / f"floor-{self.count}.pid"))
            with open(self.workdir / "floor.log", "ab") as out:
                self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=subprocess.STDOUT, cwd=self.workdir,
                                              start_new_session=True, pass_fds=(sock.fileno(),))
        finally:
            sock.close()
        self.qmp = QMPClient(f"floor-{self.count}")
        self.events = EventListener(names=("MIGRATION",))
        self.qmp.register_listener(self.events)
        await asyncio.wait_for(self.qmp.connect(str(sock_path)), 30)
        await self.qmp.execute("migrate-set-capabilities", EVENTS)

    async def start(self) -> None:
        await self.launch()
        assert self.qmp is not None
        await self.qmp.execute("cont")

    async def _completed(self) -> None:
        assert self.events is not None
        while True:
            data = (await self.events.get()).get("data")
            status = data.get("status") if isinstance(data, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"floor migration {status}")

    async def save(self, argv: list[str], path: Path) -> None:
        assert self.qmp is not None and self.popen is not None
        await self.qmp.execute("stop")
        await self.qmp.execute("migrate-set-parameters",
                               {"max-bandwidth": UNLIMITED_BANDWIDTH_BYTES})
        await self.qmp.execute("migrate", {"uri": f"exec:{shlex.join(argv)} > "
                                                  f"{shlex.quote(str(path))}"})
        await self._completed()
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        await self.qmp.execute("quit")
        await self._gone()

    async def restore(self, argv: list[str], path: Path) -> None:
        await self.launch("defer")
        assert self.qmp is not None
        await self.qmp.execute("migrate-incoming", {"uri": f"exec:{shlex.join(argv)} < "
                                                           f"{shlex.quote(str(path))}"})
        await self._completed()
        await self.qmp.execute("cont")

    async def _gone(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), 5)
        if self.popen is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.popen.wait, 30)

    def close(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(asyncio.wait_for(self.qmp.disconnect(), 5))
        if self.popen is not None and self.popen.poll() is None:
            stop_pid(self.popen.pid, timeout=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=5)
        self.loop.close()


def _floor_argvs(name: str) -> tuple[list[str], list[str]]:
    """The floor's shell pipeline ends: the same compressor argv, `cat` for raw."""
    return compress_argv(name) or ["cat"], decompress_argv(name) or ["cat"]


def _timed(fn: Any, *args: Any, **kwargs: Any) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def ferry_sample(client: Client, name: str, comp: str, path: Path) -> Sample:
    save_s = _timed(client.call, "alpha", "save", timeout=TIMEOUT_S, domain=name,
                    path=str(path), compression=comp)
    size = path.stat().st_size
    restore_s = _timed(client.call, "alpha", "restore", timeout=TIMEOUT_S, path=str(path))
    path.unlink()
    return Sample(save_s, restore_s, size)


def floor_sample(twin: FloorTwin, comp: str, path: Path) -> Sample:
    out, back = _floor_argvs(comp)
    save_s = _timed(twin.run, twin.save(out, path))
    size = path.stat().st_size
    restore_s = _timed(twin.run, twin.restore(back, path))
    path.unlink()
    return Sample(save_s, restore_s, size)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, root: Path, stack: Stack, twins: list[FloorTwin]
        ) -> dict[str, tuple[list[Sample], list[Sample]]]:
    stack.start_redis()
    stack.start_worker("alpha")
    client = Client(load({"FERRY_BROKER_URL": stack.broker_url}))
    image = build_image(root / "guest.img", random_mib=args.random_mib, rate_mib_s=0)
    xmls = {}
    for side in ("ferry", "floor"):
        shutil.copyfile(image, root / f"{side}.img")
        xmls[side] = guest_xml(f"bench-{side}", root / f"{side}.img", root / f"{side}.serial",
                               memory_mib=args.memory_mib, domain_type="qemu")
    client.call("alpha", "define", xml=xmls["ferry"])
    client.call("alpha", "start", domain="bench-ferry")
    twin = FloorTwin(xmls["floor"], root)
    twins.append(twin)
    twin.run(twin.start())
    for side in ("ferry", "floor"):
        wait_filled(root / f"{side}.serial", args.fill_timeout, f"the {side} guest to fill")
    results: dict[str, tuple[list[Sample], list[Sample]]] = {}
    for comp in args.compressors:
        mine, floor = results.setdefault(comp, ([], []))
        for i in range(args.slow_runs if comp in SLOW else args.runs):
            # Alternate who goes first: this machine's load drifts over minutes.
            for side in ("ferry", "floor") if i % 2 == 0 else ("floor", "ferry"):
                if side == "ferry":
                    mine.append(ferry_sample(client, "bench-ferry", comp, root / "ferry.save"))
                else:
                    floor.append(floor_sample(twin, comp, root / "floor.save"))
            _log(f"[{comp}] {i + 1} ferry save {mine[-1].save_s:.2f}s restore "
                 f"{mine[-1].restore_s:.2f}s {mine[-1].size >> 20} MiB | floor save "
                 f"{floor[-1].save_s:.2f}s restore {floor[-1].restore_s:.2f}s "
                 f"{floor[-1].size >> 20} MiB")
    return results


def markdown(args: argparse.Namespace, results: dict[str, tuple[list[Sample], list[Sample]]],
             info: dict[str, Any]) -> str:
    def med(xs: Sequence[Sample], attr: str) -> float:
        return float(statistics.median(getattr(s, attr) for s in xs))

    lines = [
        "# Save and restore: ferry against the exec: floor", "",
        f"`python -m scripts.bench.images --runs {args.runs} --slow-runs {args.slow_runs}`, "
        f"{info['date']}: {info['nproc']} CPUs ({info['cpu_model'] or 'unknown CPU'}), "
        f"{info['qemu']}, TCG guest of {args.memory_mib} MiB, {args.random_mib} MiB random, "
        f"the rest zero. Medians of {args.runs} runs ({args.slow_runs} for bzip2 and xz), "
        "ferry and floor interleaved, who goes first alternating; ratio = ferry / floor "
        "(target <= 1.1).", "",
        "| compression | image MiB | floor MiB | save s | floor save s | save ratio "
        "| restore s | floor restore s | restore ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for comp, (mine, floor) in results.items():
        s, fs = med(mine, "save_s"), med(floor, "save_s")
        r, fr = med(mine, "restore_s"), med(floor, "restore_s")
        lines.append(f"| {comp} | {med(mine, 'size') / 2**20:.1f} | "
                     f"{med(floor, 'size') / 2**20:.1f} | {s:.2f} | {fs:.2f} | {s / fs:.2f} | "
                     f"{r:.2f} | {fr:.2f} | {r / fr:.2f} |")
    lines += ["", "ferry's image carries a 4 KiB-aligned header (magic, version, XML, "
              "compression, was-running) before the stream; the floor's file is the bare "
              "stream. Both fsync the file; ferry also renames it into place.", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="samples per compressor (default 3)")
    p.add_argument("--slow-runs", type=int, default=1,
                   help="samples for bzip2 and xz, minutes each at 1 GiB (default 1)")
    p.add_argument("--memory-mib", type=int, default=1024)
    p.add_argument("--random-mib", type=int, default=512)
    p.add_argument("--compressors", nargs="+", choices=tuple(COMPRESSORS),
                   default=list(COMPRESSORS))
    p.add_argument("--fill-timeout", type=float, default=900)
    p.add_argument("--out", type=Path, default=BENCH_DIR / "IMAGES.md")
    p.add_argument("--log-level", default="INFO", help="FERRY_LOG_LEVEL of the worker")
    p.add_argument("--keep", action="store_true", help="keep the temporary root afterwards")
    args = p.parse_args(argv)
    if args.runs < 1 or args.slow_runs < 1:
        p.error("--runs and --slow-runs must be at least 1")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks that stop everything


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    # short: socket paths; searchable: a confined QEMU reaches the images in it
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-bimg-", dir="/tmp")))
    stack = Stack(root=root / "stack", log_level=args.log_level)
    twins: list[FloorTwin] = []
    info = machine()
    try:
        results = run(args, root, stack, twins)
    finally:
        for twin in twins:
            twin.close()
        stack.stop(kill_guests=True)
        if args.keep:
            _log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = markdown(args, results, info)
    args.out.write_text(text)
    print(text)
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
