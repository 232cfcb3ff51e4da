"""`python -m scripts.bench` (`make bench`): ferry's live migration against the raw QMP floor.

Starts its own redis-server and hosts alpha and beta (scripts.testbed.stack.Stack) in
a temporary root, one ferry guest and one floor guest per size, interleaves
the samples, and stops every process it started, by pid, also on failure.
`--case transports` compares managed, p2p and p2p tunnelled migration and the
floor on one guest instead (scripts/bench/transports.py, TRANSPORTS.md);
`--case scale` moves N small guests at once between 4 namespace hosts, beside
the floor at the same concurrency (scripts/bench/scale.py, SCALE.md).

Every run writes its raw samples (<timestamp>.json and .md) to --out, by
default scripts/bench/results/, which git ignores; the curated *.md here get
the new section and keep their hand-written notes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from scripts.bench import storage as storage_bench
from scripts.bench.floor import FloorGuest, FloorSample
from scripts.bench.migration import (
    FerryGuest,
    FerrySample,
    ferry_initial_downtime_ms,
    foreign_qemu,
    start_stack,
    wait_filled,
)
from scripts.bench.report import case_json, machine, markdown, resummarize
from scripts.bench.scale import markdown as scale_markdown
from scripts.bench.scale import run_scale
from scripts.bench.transports import run_transports, tunnel_settings
from scripts.bench.transports_report import markdown as transports_markdown
from scripts.testbed.guestimage import MAX_REGION_MIB, build_image
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import Stack, searchable
from tasks.client import Client

BENCH_DIR = Path(__file__).resolve().parent
RUNS_DIR = BENCH_DIR / "results"  # raw output of every run; in .gitignore
NOTES_MARK = "<!-- notes: everything from here on is kept when the bench rewrites this file -->"
CASE = "managed v3 vs floor"
DEFAULT_SIZES = (256, 1024, 4096)  # the sizes issue 10 asks for
LARGE_MIB = 4096


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a MiB size list: {text!r}") from None
    if not sizes or any(s < 64 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes are MiB, at least 64: {text!r}")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__)
    p.add_argument("--case", choices=("floor", "transports", "scale", "storage"),
                   default="floor",
                   help="floor: managed v3 against the floor per size (default, RESULTS.md); "
                        "transports: managed, p2p, p2p tunnelled and the floor on one 1 GiB "
                        "guest, rotated rounds (TRANSPORTS.md; --sizes and --order unused); "
                        "scale: N guests at once on 4 namespace hosts (SCALE.md, --counts); "
                        "storage: --copy-storage-all of a 2 GiB disk against qemu-img "
                        "convert into an NBD export (STORAGE.md, --runs, --warmup)")
    p.add_argument("--counts", default="1,2,4,8,16",
                   help="scale: numbers of guests moved at once (default 1,2,4,8,16)")
    p.add_argument("--runs", type=int, default=None,
                   help="samples per side and size (default 5); transports: rounds (default 8)")
    p.add_argument("--sizes", type=_sizes, nargs="+", default=[list(DEFAULT_SIZES)],
                   metavar="MIB", help="guest memory sizes in MiB, half of it random "
                                       "(default 256 1024 4096)")
    p.add_argument("--skip-large", action="store_true",
                   help=f"leave out sizes of {LARGE_MIB} MiB and more (their guests need "
                        "~8 GiB of memory at the peak and ~30 s each to fill)")
    p.add_argument("--out", type=Path, default=RUNS_DIR,
                   help="directory for <timestamp>.json and .md (default scripts/bench/results, "
                        "not tracked by git)")
    p.add_argument("--warmup", type=int, default=None,
                   help="migrations per side before the samples, reported but not counted "
                        "(default 2: one each way); transports: rounds (default 1)")
    p.add_argument("--floor-downtime", default="ferry", metavar="ferry|qemu|MS",
                   help="the floor's downtime-limit: ferry's first downtime step (default), "
                        "QEMU's own default (300 ms), or MS")
    p.add_argument("--order", choices=("abab", "abba"), default="abab",
                   help="abab: ferry, floor, ferry, floor, ... (default); abba: every other "
                        "pair starts with the floor, which cancels a position effect")
    p.add_argument("--log-level", default="INFO",
                   help="FERRY_LOG_LEVEL of the workers (DEBUG logs every QMP command)")
    p.add_argument("--fill-timeout", type=float, default=900,
                   help="seconds to wait for a guest to fill its random memory")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="run nothing: write the report of a saved floor-case result again "
                        "(its .md and RESULTS.md), with summaries recomputed from its samples")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary root (worker logs, QEMU logs) afterwards")
    args = p.parse_args(argv)
    args.sizes = [s for group in args.sizes for s in group
                  if not (args.skip_large and s >= LARGE_MIB)]
    if not args.sizes:
        p.error("--skip-large left no size to run")
    transports = args.case == "transports"
    if args.runs is None:
        args.runs = 8 if transports else (3 if args.case == "scale" else 5)
    if args.warmup is None:
        args.warmup = 1 if transports else 2
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be at least 1 and --warmup at least 0")
    if args.floor_downtime not in ("ferry", "qemu") and not args.floor_downtime.isdigit():
        p.error("--floor-downtime must be ferry, qemu or a number of ms")
    return args


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class CaseRun:
    size: int
    runs: int
    warmup: int
    floor_downtime: str  # "ferry" (match ferry's first downtime step), "qemu", or ms
    fill_timeout: float
    order: str  # "abab": ferry then floor in every pair; "abba": every other pair floor first


def _floor_downtime(choice: str, size: int) -> int | None:
    if choice == "ferry":
        return ferry_initial_downtime_ms(size)
    if choice == "qemu":
        return None
    return int(choice)


def run_case(c: CaseRun, client: Client, root: Path, floors: list[FloorGuest]) -> dict[str, Any]:
    size = c.size
    random_mib = random_half(size)
    case_dir = root / f"case-{size}"
    case_dir.mkdir()
    image = build_image(case_dir / "guest.img", random_mib=random_mib, rate_mib_s=0)
    xmls = {}
    for side in ("ferry", "floor"):
        disk = case_dir / f"{side}.img"
        shutil.copyfile(image, disk)
        xmls[side] = guest_xml(f"bench-{side}-{size}", disk, case_dir / f"{side}.serial",
                               memory_mib=size, domain_type="qemu")
    ferry = FerryGuest(client, f"bench-ferry-{size}", xmls["ferry"])
    floor_dir = case_dir / "floor"
    floor_dir.mkdir()
    downtime = _floor_downtime(c.floor_downtime, size)
    floor = FloorGuest(xmls["floor"], floor_dir, downtime_limit_ms=downtime)
    floors.append(floor)
    samples: list[tuple[FerrySample, FloorSample, int]] = []
    try:
        _log(f"[{size} MiB] starting both guests, filling {random_mib} MiB each (TCG)")
        t0 = time.monotonic()
        ferry.start()
        floor.start()
        wait_filled(case_dir / "ferry.serial", c.fill_timeout, "the ferry guest to fill")
        wait_filled(case_dir / "floor.serial", c.fill_timeout, "the floor guest to fill")
        _log(f"[{size} MiB] both filled after {time.monotonic() - t0:.0f}s; floor "
             f"downtime-limit {downtime or 'QEMU default'} ms")
        for i in range(c.warmup + c.runs):
            tag = f"warm-up {i + 1}" if i < c.warmup else f"{i - c.warmup + 1}/{c.runs}"
            others = foreign_qemu(str(root))
            floor_first = c.order == "abba" and i % 2 == 1
            b = floor.migrate() if floor_first else None
            a = ferry.migrate()
            _log(f"[{size} MiB] {tag} ferry {a.direction}: {a.wall_ms:.0f} ms, downtime "
                 f"{a.downtime_ms} ms, phases "
                 + " ".join(f"{p['phase']}={p['elapsed_ms']:.0f}" for p in a.phases))
            b = b or floor.migrate()
            _log(f"[{size} MiB] {tag} floor {b.direction}: {b.wall_ms:.0f} ms, downtime "
                 f"{b.downtime_ms} ms, to source quit {b.quit_ms:.0f} ms"
                 + (" (ran first)" if floor_first else ""))
            others = max(others, foreign_qemu(str(root)))
            if others:
                _log(f"[{size} MiB] {tag}: {others} other QEMU process(es) on this machine")
            samples.append((a, b, others))
    finally:
        ferry.remove()
        floor.close()
        floors.remove(floor)
    return case_json(CASE, size, random_mib, samples, c.warmup, downtime)


def random_half(size: int) -> int:
    return min(size // 2, MAX_REGION_MIB)


def needed_mib(random_mib: int) -> int:
    """Memory a case takes at its peak: two guests (ferry's, the floor's) and the incoming
    QEMU of the migration running, each holding the random half (zero pages are never
    touched on the dest) plus ~256 MiB of QEMU, plus 1 GiB for everything else."""
    return 3 * (random_mib + 256) + 1024


def check_memory(sizes: Sequence[int]) -> None:
    """Refuse, before starting anything, a size this machine cannot hold (the sizes run
    one after the other), rather than let the OOM killer pick a QEMU mid-run."""
    meminfo = Path("/proc/meminfo").read_text()
    available = next(int(line.split()[1]) // 1024 for line in meminfo.splitlines()
                     if line.startswith("MemAvailable:"))
    for size in sizes:
        if available < needed_mib(random_half(size)):
            raise SystemExit(f"the {size} MiB case needs ~{needed_mib(random_half(size))} "
                             f"MiB of memory, {available} MiB are available (leave it out: "
                             "--skip-large)")


def write_results(path: Path, text: str) -> None:
    """The new generated section, then the hand-written notes the file had (if any)."""
    notes = ""
    if path.exists():
        old = path.read_text()
        at = old.find(NOTES_MARK)
        if at >= 0:
            notes = "\n" + old[at:]
    path.write_text(text + notes)


def _cpu_pids(stack: Stack) -> dict[int, str]:
    """The processes the transports case samples CPU time of, besides QEMU."""
    pids = {os.getpid(): "bench client"}
    if stack.redis_proc is not None:
        pids[stack.redis_proc.pid] = "redis"
    for name, w in stack.workers.items():
        if w.proc is not None:
            pids[w.proc.pid] = f"worker {name}"
    return pids


def _terminate(signum: int, frame: FrameType | None) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the clean-up short
    raise SystemExit(128 + signum)  # runs the finally blocks that stop everything


def rewrite_report(path: Path) -> int:
    result = resummarize(json.loads(path.read_text()))
    text = markdown(result)
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(text)
    write_results(BENCH_DIR / "RESULTS.md", text)
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if args.report is not None:
        return rewrite_report(args.report)
    if args.case == "scale":
        return main_scale(args)
    if args.case == "storage":
        return storage_bench.main(["--runs", str(args.runs), "--warmup",
                                   str(min(args.warmup, 1)), "--out", str(args.out)])
    if args.case == "floor":
        check_memory(args.sizes)
    # short: socket paths; searchable: a confined QEMU reaches the images in it
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-bench-", dir="/tmp")))
    stack = Stack(root=root, log_level=args.log_level)
    floors: list[FloorGuest] = []
    result: dict[str, Any] = {"machine": machine(), "cases": [],
                              "args": {"runs": args.runs, "warmup": args.warmup,
                                       "sizes": args.sizes, "log_level": args.log_level,
                                       "floor_downtime": args.floor_downtime,
                                       "order": args.order}}
    if args.case == "transports":
        result["args"] = {k: result["args"][k] for k in ("runs", "warmup", "log_level",
                                                         "floor_downtime")}
        result["args"]["case"] = "transports"
        result["args"]["tunnel"] = tunnel_settings()
    try:
        _log(f"state root {root}")
        client = start_stack(stack)
        if args.case == "transports":
            result["cases"].append(run_transports(
                client, root, floors, runs=args.runs, warmup=args.warmup,
                fill_timeout=args.fill_timeout,
                floor_downtime_ms=_floor_downtime(args.floor_downtime, 1024),
                cpu_pids=_cpu_pids(stack)))
        for size in args.sizes if args.case == "floor" else []:
            case = CaseRun(size, args.runs, args.warmup, args.floor_downtime,
                           args.fill_timeout, args.order)
            result["cases"].append(run_case(case, client, root, floors))
        result["machine"]["loadavg_end"] = list(os.getloadavg())
    finally:
        for floor in floors:
            floor.close()
        stack.stop(kill_guests=True)
        if args.keep:
            _log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    transports = args.case == "transports"
    text = transports_markdown(result) if transports else markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-transports" if transports else "")
    (args.out / f"{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stamp}.md").write_text(text)
    section = BENCH_DIR / ("TRANSPORTS.md" if transports else "RESULTS.md")
    write_results(section, text)
    print(text)
    _log(f"wrote {args.out / stamp}.json, .md and {section}")
    return 0


def main_scale(args: argparse.Namespace) -> int:
    counts = [int(x) for x in args.counts.split(",") if x.strip()]
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-bench-", dir="/tmp")))
    result: dict[str, Any] = {"machine": machine(), "cases": [],
                              "args": {"case": "scale", "runs": args.runs, "counts": counts,
                                       "log_level": args.log_level}}
    try:
        _log(f"state root {root}")
        result["cases"].append(run_scale(root, counts, args.runs, args.log_level))
        result["machine"]["loadavg_end"] = list(os.getloadavg())
    finally:
        if args.keep:
            _log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = scale_markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-scale"
    (args.out / f"{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stamp}.md").write_text(text)
    write_results(BENCH_DIR / "SCALE.md", text)
    print(text)
    _log(f"wrote {args.out / stamp}.json, .md and {BENCH_DIR / 'SCALE.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
