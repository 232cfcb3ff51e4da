"""`python -m scripts.bench.streams` (`make bench-streams`): parallel connections, compression,
the tunnel and the switch-over, interleaved in one run.

Two TCG guests of 1 GiB: "random" (768 MiB of random bytes) and "text" (768 MiB of
compressible pages, 5/8 hex text and 3/8 zeros, 3.1:1 under zstd -1), both also
rewriting 64 MiB at 8 MiB/s as a server does (what xbzrle is for).  They live on two
namespace hosts of a fleet (scripts/testbed/fleet.py: each host its own network
namespace, a data link for migrations and a broker link to Redis), so a 100 MiB/s
link can be made with `tc ... tbf` on a host's data link (never on the machine's
`lo`).  `--net loopback` runs the uncapped variants on a local ferry over
127.0.0.1 instead (the capped ones are skipped there).

Every round runs each variant once per guest, the order rotated by one from
round to round; each migration moves the guest to the other host.  Variants:

    direct            managed v3, one connection
    direct par2/par4  --parallel, 2 or 4 connections (QEMU multifd)
    p2p direct        peer-to-peer, one connection (what the tunnel is compared with)
    tunnel            p2p --tunnelled, one stream through Redis
    tunnel par2/par4  p2p --tunnelled --parallel: a stream per connection
    cap direct        as direct, the source's data link capped at 100 MiB/s
    cap xbzrle        --compressed (xbzrle), capped
    cap par2          --parallel, capped
    cap zstd par2     --parallel --comp-methods zstd, capped
    floor             (random guest only) its twin moved by bare QEMUs over QMP, tcp
                      (scripts/bench/floor.py), no ferry: QEMU's own pause
    floor rp+pbs      the same with return-path and pause-before-switchover, as ferry
                      sets them: what they cost QEMU's pause, paired with the floor

Per sample: the caller's wall time around `.wait()`, QEMU's own time
(statistics `time_elapsed`), memory processed, throughput (processed / QEMU
time), QEMU's downtime, the guest's pause (QEMU's STOP on the source to RESUME on
the dest), what went through the tunnel, and CPU seconds per process from /proc
(scripts/bench/cpu.py).  The machine is shared: the load average and foreign
QEMU processes are recorded with every sample, and ratios are also given per
round (paired), which cancels slow phases of the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from config.settings import load
from scripts.bench.cpu import CpuSampler
from scripts.bench.floor import FloorGuest
from scripts.bench.migration import foreign_qemu, wait_filled
from scripts.bench.report import machine
from scripts.bench.streams_report import markdown, summarize
from scripts.testbed.fleet import Fleet
from scripts.testbed.guestimage import build_image
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import Stack
from tasks.client import Client

BENCH_DIR = Path(__file__).resolve().parent
RUNS_DIR = BENCH_DIR / "results"
MEMORY_MIB = 1024
FILL_MIB = 768
DIRTY_MIB, DIRTY_RATE = 64, 8
CAP = "100mibps"  # tc's MiB/s: a shared 1 GbE link
MIB = 1 << 20
GUESTS = {"random": {"random_mib": FILL_MIB}, "text": {"text_mib": FILL_MIB}}
CAPPED = frozenset({"cap direct", "cap xbzrle", "cap par2", "cap zstd par2"})
VARIANTS: dict[str, dict[str, Any]] = {
    "direct": {},
    "direct par2": {"parallel": True},
    "direct par4": {"parallel": True, "parallel_connections": 4},
    "p2p direct": {"p2p": True},
    "tunnel": {"p2p": True, "tunnelled": True},
    "tunnel par2": {"p2p": True, "tunnelled": True, "parallel": True},
    "tunnel par4": {"p2p": True, "tunnelled": True, "parallel": True,
                    "parallel_connections": 4},
    "cap direct": {},
    "cap xbzrle": {"compressed": True},
    "cap par2": {"parallel": True},
    "cap zstd par2": {"parallel": True, "comp_methods": "zstd"},
    "floor": {},
    "floor rp+pbs": {},
}
FLOORS = frozenset({"floor", "floor rp+pbs"})
HOSTS = ("p1", "p2")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Bed:
    """Two hosts (a fleet, or a local stack), a client, and the cap on their data links."""

    def __init__(self, root: Path, net: str) -> None:
        self.root, self.net = root, net
        self.fleet: Fleet | None = None
        self.stack: Stack
        if net == "fleet":
            self.fleet = Fleet(root=root, log_level="INFO")
            self.fleet.start(list(HOSTS))
            assert self.fleet.stack is not None
            self.stack = self.fleet.stack
        else:
            self.stack = Stack(root=root, log_level="INFO")
            self.stack.start_redis()
            for name in HOSTS:
                self.stack.start_worker(name)
        self.client = Client(load({"FERRY_BROKER_URL": self.stack.broker_url}))
        self.capped = False

    def cap(self, on: bool) -> None:
        """100 MiB/s out of each host's data link (tbf, inside its namespace)."""
        if on == self.capped or self.fleet is None:
            return
        for host in self.fleet.hosts.values():
            args = ["replace", "dev", "data0", "root", "tbf", "rate", CAP, "burst", "2mb",
                    "latency", "50ms"] if on else ["del", "dev", "data0", "root"]
            subprocess.run(["ip", "netns", "exec", host.netns, "tc", "qdisc", *args],
                           check=on, capture_output=True, timeout=30)
        self.capped = on

    def cpu_pids(self) -> dict[int, str]:
        pids = {os.getpid(): "bench client"}
        if self.stack.redis_proc is not None:
            pids[self.stack.redis_proc.pid] = "redis"
        for name, w in self.stack.workers.items():
            if w.proc is not None:
                pids[w.proc.pid] = f"worker {name}"
        return pids

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.cap(False)
        if self.fleet is not None:
            self.fleet.stop()
        else:
            self.stack.stop(kill_guests=True)


class Guest:
    def __init__(self, bed: Bed, kind: str, case_dir: Path) -> None:
        self.bed, self.kind = bed, kind
        self.name = f"bench-streams-{kind}"
        image = build_image(case_dir / f"{kind}.img", dirty_mib=DIRTY_MIB,
                            rate_mib_s=DIRTY_RATE, **GUESTS[kind])
        self.serial = case_dir / f"{kind}.serial"
        self.xml = guest_xml(self.name, image, self.serial, memory_mib=MEMORY_MIB,
                             domain_type="qemu")
        self.at = HOSTS[0]

    def start(self) -> None:
        c = self.bed.client
        c.call(self.at, "define", xml=self.xml)
        c.call(self.at, "start", domain=self.name)

    def migrate(self, variant: str) -> dict[str, Any]:
        src = self.at
        dst = HOSTS[1] if src == HOSTS[0] else HOSTS[0]
        self.bed.cap(variant in CAPPED)
        with CpuSampler(self.bed.cpu_pids(), self.name, str(self.bed.root)) as sampler:
            t0 = time.perf_counter()
            summary = self.bed.client.migrate(self.name, src, dst, live=True,
                                              **VARIANTS[variant]).wait(timeout=900)
            wall = (time.perf_counter() - t0) * 1000
        self.at = dst
        st = summary.get("statistics") or {}
        qemu_ms, processed = st.get("time_elapsed"), st.get("memory_processed")
        return {"variant": variant, "guest": self.kind, "direction": f"{src}->{dst}",
                "wall_ms": wall, "qemu_ms": qemu_ms, "memory_processed": processed,
                "throughput_mib_s": processed / MIB / (qemu_ms / 1000)
                if processed and qemu_ms else None,
                "downtime_ms": st.get("downtime"), "guest_pause_ms": st.get("guest_pause_ms"),
                "setup_time_ms": st.get("setup_time"), "iterations": st.get("memory_iteration"),
                "stream_bytes": st.get("stream_bytes"),
                "xbzrle_pages": st.get("compression_pages"),
                "cpu_s": _roles(sampler.result(), src, dst)}

    def remove(self) -> None:
        for host in HOSTS:
            for task in ("destroy", "undefine"):
                with contextlib.suppress(Exception):
                    self.bed.client.call(host, task, domain=self.name, timeout=30)


class FloorTwin:
    """The random guest's twin on bare QEMUs (scripts/bench/floor.py), on the same hosts."""

    def __init__(self, bed: Bed, case_dir: Path) -> None:
        self.bed, self.kind = bed, "random"
        image = build_image(case_dir / "floor.img", dirty_mib=DIRTY_MIB,
                            rate_mib_s=DIRTY_RATE, **GUESTS["random"])
        self.serial = case_dir / "floor.serial"
        xml = guest_xml("bench-streams-floor", image, self.serial, memory_mib=MEMORY_MIB,
                        domain_type="qemu")
        places = None
        if bed.fleet is not None:
            hosts = [bed.fleet.hosts[h] for h in HOSTS]
            places = ((hosts[0].netns, hosts[0].address), (hosts[1].netns, hosts[1].address))
        work = case_dir / "floor"
        work.mkdir()
        self.floor = FloorGuest(xml, work, places=places, kvm=False)
        self.floor.start()

    def migrate(self, variant: str) -> dict[str, Any]:
        self.bed.cap(False)
        self.floor.switchover = variant == "floor rp+pbs"
        name = self.floor.definition.name
        with CpuSampler(self.bed.cpu_pids(), name, str(self.bed.root.parent)) as sampler:
            f = self.floor.migrate()
        return {"variant": variant, "guest": self.kind, "direction": f.direction,
                "wall_ms": f.wall_ms, "qemu_ms": f.total_time_ms,
                "memory_processed": f.memory_processed,
                "throughput_mib_s": f.memory_processed / MIB / (f.total_time_ms / 1000)
                if f.memory_processed and f.total_time_ms else None,
                "downtime_ms": f.downtime_ms, "guest_pause_ms": f.pause_ms,
                "setup_time_ms": f.setup_time_ms, "iterations": f.dirty_sync_count,
                "stream_bytes": None, "xbzrle_pages": None, "cpu_s": sampler.result()}

    def remove(self) -> None:
        self.floor.close()


def _roles(cpu: dict[str, float], src: str, dst: str) -> dict[str, float]:
    """"worker p1[ tunnel]" -> "worker src[ tunnel]" by the sample's direction."""
    out = {}
    for key, value in cpu.items():
        for host, role in ((src, "src"), (dst, "dst")):
            if key == f"worker {host}" or key.startswith(f"worker {host} "):
                key = key.replace(f"worker {host}", f"worker {role}", 1)
                break
        out[key] = value
    return out


def schedule(variants: Sequence[str], guests: Sequence[str], runs: int,
             warmup: int) -> list[tuple[int, str, str]]:
    """(round, guest, variant): each round every variant per guest, rotated by the round
    (the floors with the random guest only)."""
    out = []
    for i in range(warmup + runs):
        k = i % len(variants)
        order = list(variants[k:]) + list(variants[:k])
        out += [(i, g, v) for v in order for g in guests if v not in FLOORS or g == "random"]
    return out


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    variants = [v for v in args.variants if args.net == "fleet" or v not in CAPPED]
    result: dict[str, Any] = {"machine": machine(), "args": {
        "runs": args.runs, "warmup": args.warmup, "net": args.net, "guests": args.guests,
        "variants": variants, "memory_mib": MEMORY_MIB, "fill_mib": FILL_MIB,
        "dirty": [DIRTY_MIB, DIRTY_RATE], "cap": CAP,
        "tunnel": {"window_mib": load().tunnel_window_mib,
                   "chunk_kib": load().tunnel_chunk_kib}}, "samples": []}
    bed = Bed(root / "bed", args.net)
    guests: dict[str, Guest] = {}
    twin: FloorTwin | None = None
    try:
        case_dir = root / "guests"
        case_dir.mkdir()
        for kind in args.guests:
            guests[kind] = Guest(bed, kind, case_dir)
            guests[kind].start()
        if FLOORS & set(variants) and "random" in guests:
            twin = FloorTwin(bed, case_dir)
        serials = [(g.serial, g.kind) for g in guests.values()]
        if twin is not None:
            serials.append((twin.serial, "floor"))
        for serial, kind in serials:
            wait_filled(serial, args.fill_timeout, f"the {kind} guest to fill")
        _log(f"[streams] guests filled; {len(variants)} variants x {len(guests)} guests, "
             f"{args.runs} rounds + {args.warmup} warm-up")
        for i, kind, variant in schedule(variants, list(guests), args.runs, args.warmup):
            load_avg = os.getloadavg()[0]
            others = foreign_qemu(str(root))
            mover = twin if variant in FLOORS else guests[kind]
            assert mover is not None
            rec = mover.migrate(variant)
            rec.update(round=i, warmup=i < args.warmup, loadavg=load_avg, foreign_qemu=others)
            result["samples"].append(rec)
            _log(f"[streams] {'warm-up' if rec['warmup'] else f'round {i - args.warmup + 1}'}"
                 f" {kind:<6} {variant:<13} {rec['direction']}: wall {rec['wall_ms']:.0f} ms, "
                 f"QEMU {rec['qemu_ms']} ms, {rec['throughput_mib_s'] or 0:.0f} MiB/s, "
                 f"downtime {rec['downtime_ms']} ms, pause {rec['guest_pause_ms']} ms, "
                 f"load {load_avg:.1f}")
    finally:
        for g in guests.values():
            g.remove()
        if twin is not None:
            twin.remove()
        bed.stop()
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["summary"] = summarize(result)
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.streams", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="counted rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="rounds not counted (default 1)")
    p.add_argument("--net", choices=("fleet", "loopback"), default="fleet")
    p.add_argument("--guests", type=lambda s: s.split(","), default=list(GUESTS),
                   help="random,text (default both)")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS),
                   help="comma-separated subset of the variants (default all)")
    p.add_argument("--fill-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=RUNS_DIR)
    p.add_argument("--report", type=Path, help="re-render the Markdown of a saved JSON run")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS] + \
        [g for g in args.guests if g not in GUESTS]
    if unknown:
        p.error(f"unknown variant or guest: {', '.join(unknown)}")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)  # runs the finally blocks that stop everything


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        result = json.loads(args.report.read_text())
        result["summary"] = summarize(result)
        print(markdown(result))
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    root = Path(tempfile.mkdtemp(prefix="ferry-bs-", dir="/tmp"))
    try:
        result = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-streams"
    (args.out / f"{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stamp}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
