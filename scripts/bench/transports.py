"""`python -m scripts.bench --case transports`: ferry's transports against the raw floor.

One ferry guest (1 GiB, 768 MiB random, TCG) on the local ferry and its twin
in a bare QEMU (scripts.bench.floor).  Every round migrates with each of the
four variants once, the order rotated from round to round (A B C D, B C D A,
C D A B, D A B C, ...) so that no variant always goes first:

    managed direct   Client.migrate(live=True): the v3 chain, QEMU's tcp stream
    p2p direct       p2p=True: one task on the source drives the phases, tcp
    p2p tunnelled    p2p=True, tunnelled=True: the stream goes through Redis
    floor            the same QEMU argv driven over QMP, tcp (no ferry)

The three ferry variants move the same guest (each to the other host), the
floor moves its twin.  Per sample: the wall time, QEMU's own migration time
(ferry: the statistics' time_elapsed, floor: total-time), memory processed,
QEMU's bandwidth figure, and the downtime.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from redis.utils import HIREDIS_AVAILABLE

from config.settings import load
from scripts.bench.cpu import CpuSampler
from scripts.bench.floor import FloorGuest, FloorSample
from scripts.bench.migration import FerryGuest, FerrySample, foreign_qemu, wait_filled
from scripts.testbed.guestimage import build_image
from scripts.testbed.guestxml import guest_xml
from tasks.client import Client

CASE = "transports"
MEMORY_MIB = 1024
RANDOM_MIB = 768
MIB = 1 << 20
MANAGED, P2P, TUNNELLED, FLOOR = "managed direct", "p2p direct", "p2p tunnelled", "floor"
VARIANTS = (MANAGED, P2P, TUNNELLED, FLOOR)
OPTIONS: dict[str, dict[str, bool]] = {
    MANAGED: {}, P2P: {"p2p": True}, TUNNELLED: {"p2p": True, "tunnelled": True},
}
# (numerator, denominator, figure, target, "min" | "max"): what the issue asks to hold
RATIOS: tuple[tuple[str, str, str, float, str], ...] = (
    (TUNNELLED, P2P, "throughput_mib_s", 0.8, "min"),  # issue 10 (the p2p issue: 0.7)
    (P2P, MANAGED, "wall_ms", 1.05, "max"),
    (P2P, MANAGED, "outside_qemu_ms", 0.0, ""),
    (TUNNELLED, MANAGED, "throughput_mib_s", 0.8, "min"),
    (MANAGED, FLOOR, "wall_ms", 0.0, ""),
    (MANAGED, FLOOR, "throughput_mib_s", 0.0, ""),
)


def tunnel_settings() -> dict[str, Any]:
    """The tunnel's settings the workers get (they inherit this environment)."""
    s = load()
    return {"window_mib": s.tunnel_window_mib, "chunk_kib": s.tunnel_chunk_kib,
            "hiredis": HIREDIS_AVAILABLE}


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def rotation(i: int) -> tuple[str, ...]:
    """Round i's order: VARIANTS rotated left by i."""
    k = i % len(VARIANTS)
    return VARIANTS[k:] + VARIANTS[:k]


def schedule(runs: int, warmup: int) -> list[tuple[int, int, str, str]]:
    """(round, position, variant, kind) in the order to run them.

    A round has three ferry migrations, so the guest starts every other round
    on the other host, and with four rotations each ferry variant would go one
    way three times out of four.  An extra managed migration after every four
    counted rounds ("reposition", not counted) swaps the start, so every 8
    rounds give each variant every position twice and each direction 4 times.
    """
    out = []
    for i in range(warmup + runs):
        j = i - warmup
        out += [(i, pos, v, "warm-up" if j < 0 else "sample")
                for pos, v in enumerate(rotation(j))]
        if j >= 0 and j % 4 == 3 and i < warmup + runs - 1:
            out.append((i, len(VARIANTS), MANAGED, "reposition"))
    return out


def _throughput(processed: int | None, ms: float | None) -> float | None:
    return processed / MIB / (ms / 1000) if processed and ms else None


def ferry_record(s: FerrySample) -> dict[str, Any]:
    return {"direction": s.direction, "wall_ms": s.wall_ms, "qemu_ms": s.time_elapsed_ms,
            "downtime_ms": s.downtime_ms, "memory_processed": s.memory_processed,
            "qemu_mib_s": s.memory_bps / MIB if s.memory_bps else None,
            "throughput_mib_s": _throughput(s.memory_processed, s.time_elapsed_ms),
            "phases": s.phases, "detail": asdict(s)}


def floor_record(s: FloorSample) -> dict[str, Any]:
    return {"direction": s.direction, "wall_ms": s.wall_ms, "qemu_ms": s.total_time_ms,
            "downtime_ms": s.downtime_ms, "memory_processed": s.memory_processed,
            "qemu_mib_s": s.mbps * 1e6 / 8 / MIB if s.mbps else None,
            "throughput_mib_s": _throughput(s.memory_processed, s.total_time_ms),
            "phases": [], "detail": asdict(s)}


def _median(values: Sequence[float | int | None]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return statistics.median(xs) if xs else None


def _outside(r: dict[str, Any]) -> float | None:
    return r["wall_ms"] - r["qemu_ms"] if r["qemu_ms"] is not None else None


def summarize_variant(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    names: list[str] = []
    for r in rows:
        names += [p["phase"] for p in r["phases"] if p["phase"] not in names]
    walls = [r["wall_ms"] for r in rows]
    return {
        "runs": len(rows),
        "wall_ms": _median(walls),
        "wall_min_max_ms": [min(walls), max(walls)] if walls else None,
        "qemu_ms": _median([r["qemu_ms"] for r in rows]),
        "outside_qemu_ms": _median([r["outside_qemu_ms"] for r in rows]),
        "throughput_mib_s": _median([r["throughput_mib_s"] for r in rows]),
        "qemu_mib_s": _median([r["qemu_mib_s"] for r in rows]),
        "downtime_ms": _median([r["downtime_ms"] for r in rows]),
        "memory_processed_mib": _median([r["memory_processed"] / MIB for r in rows
                                         if r["memory_processed"]]),
        "phase_ms": {n: _median([p["elapsed_ms"] for r in rows for p in r["phases"]
                                 if p["phase"] == n]) for n in names},
        "outside_phases_ms": _median([r["wall_ms"] - sum(p["elapsed_ms"] for p in r["phases"])
                                      for r in rows if r["phases"]]),
        "cpu_s": {k: _median([r.get("cpu_s", {}).get(k, 0.0) for r in rows])
                  for k in sorted({k for r in rows for k in r.get("cpu_s", {})})},
    }


def ratio_rows(counted: Sequence[dict[str, Any]],
               per_variant: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each ratio twice: of the medians, and the median of the per-round ratios (paired)."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for r in counted:
        by_round.setdefault(r["round"], {})[r["variant"]] = r
    out = []
    for num, den, figure, target, kind in RATIOS:
        a, b = per_variant[num][figure], per_variant[den][figure]
        paired = [rnd[num][figure] / rnd[den][figure] for rnd in by_round.values()
                  if num in rnd and den in rnd and rnd[num][figure] and rnd[den][figure]]
        of_medians = a / b if a and b else None
        ok = None
        if kind and of_medians is not None:
            ok = of_medians >= target if kind == "min" else of_medians <= target
        out.append({"ratio": f"{num} / {den}", "figure": figure, "of_medians": of_medians,
                    "paired_median": _median(paired), "target": target or None,
                    "kind": kind or None, "met": ok})
    return out


def case_json(samples: list[dict[str, Any]], warmup: int,
              floor_downtime_limit_ms: int | None) -> dict[str, Any]:
    counted = [s for s in samples if not s["warmup"]]
    per_variant = {v: summarize_variant([s for s in counted if s["variant"] == v])
                   for v in VARIANTS}
    return {"case": CASE, "memory_mib": MEMORY_MIB, "random_mib": RANDOM_MIB,
            "warmup": warmup, "floor_downtime_limit_ms": floor_downtime_limit_ms,
            "variants": list(VARIANTS), "summary": per_variant,
            "ratios": ratio_rows(counted, per_variant), "samples": samples}


def _migrate(variant: str, ferry: FerryGuest, floor: FloorGuest,
             cpu_pids: dict[int, str], root: Path) -> dict[str, Any]:
    guest = floor.definition.name if variant == FLOOR else ferry.name
    with CpuSampler(cpu_pids, guest, str(root)) as sampler:
        if variant == FLOOR:
            rec = floor_record(floor.migrate())
        else:
            rec = ferry_record(ferry.migrate(**OPTIONS[variant]))
    rec["outside_qemu_ms"] = _outside(rec)
    rec["cpu_s"] = _roles(sampler.result(), *rec["direction"].split("->"))
    return rec


def _roles(cpu: dict[str, float], src: str, dst: str) -> dict[str, float]:
    """"worker alpha[ tunnel]" -> "worker src[ tunnel]" (or dst) by the sample's direction."""
    out = {}
    for key, value in cpu.items():
        for host, role in ((src, "src"), (dst, "dst")):
            if key == f"worker {host}" or key.startswith(f"worker {host} "):
                key = key.replace(f"worker {host}", f"worker {role}", 1)
                break
        out[key] = value
    return out


def run_transports(client: Client, root: Path, floors: list[FloorGuest], *, runs: int,
                   warmup: int, fill_timeout: float, floor_downtime_ms: int | None,
                   cpu_pids: dict[int, str]) -> dict[str, Any]:
    """`warmup` + `runs` rounds of the four variants; every QEMU started is stopped."""
    case_dir = root / "case-transports"
    case_dir.mkdir()
    image = build_image(case_dir / "guest.img", random_mib=RANDOM_MIB, rate_mib_s=0)
    xmls = {}
    for side in ("ferry", "floor"):
        disk = case_dir / f"{side}.img"
        shutil.copyfile(image, disk)
        xmls[side] = guest_xml(f"bench-{side}-transports", disk, case_dir / f"{side}.serial",
                               memory_mib=MEMORY_MIB, domain_type="qemu")
    ferry = FerryGuest(client, "bench-ferry-transports", xmls["ferry"])
    floor_dir = case_dir / "floor"
    floor_dir.mkdir()
    floor = FloorGuest(xmls["floor"], floor_dir, downtime_limit_ms=floor_downtime_ms)
    floors.append(floor)
    samples: list[dict[str, Any]] = []
    try:
        _log(f"[transports] starting both guests, filling {RANDOM_MIB} MiB each (TCG)")
        t0 = time.monotonic()
        ferry.start()
        floor.start()
        wait_filled(case_dir / "ferry.serial", fill_timeout, "the ferry guest to fill")
        wait_filled(case_dir / "floor.serial", fill_timeout, "the floor guest to fill")
        _log(f"[transports] both filled after {time.monotonic() - t0:.0f}s; floor "
             f"downtime-limit {floor_downtime_ms or 'QEMU default'} ms")
        for i, pos, variant, kind in schedule(runs, warmup):
            tag = {"sample": f"{i - warmup + 1}/{runs}", "warm-up": f"warm-up {i + 1}"}.get(
                kind, kind)
            others = foreign_qemu(str(root))
            rec = _migrate(variant, ferry, floor, cpu_pids, root)
            others = max(others, foreign_qemu(str(root)))
            rec.update(round=i, position=pos, kind=kind, warmup=kind != "sample",
                       variant=variant, foreign_qemu=others)
            samples.append(rec)
            _log(f"[transports] {tag} {variant:<14} {rec['direction']}: wall "
                 f"{rec['wall_ms']:.0f} ms, QEMU {rec['qemu_ms']} ms, "
                 f"{rec['throughput_mib_s'] or 0:.0f} MiB/s, downtime "
                 f"{rec['downtime_ms']} ms" + (f", {others} other QEMU" if others else ""))
    finally:
        ferry.remove()
        floor.close()
        floors.remove(floor)
    return case_json(samples, warmup, floor_downtime_ms)
