"""Machine facts, medians and the Markdown report of a benchmark run."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from scripts.bench.floor import FloorSample
from scripts.bench.migration import FerrySample

QEMU = "/usr/bin/qemu-system-x86_64"


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=10,
                              check=False).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        qemu = "unknown"
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "kvm_device": os.access("/dev/kvm", os.R_OK | os.W_OK),
        "accel": "tcg",
        "qemu": qemu,
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
    }


def median(values: Iterable[float | int | None]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return statistics.median(xs) if xs else None


def summarize(ferry: Sequence[FerrySample], floor: Sequence[FloorSample]) -> dict[str, Any]:
    f_wall = median(s.wall_ms for s in ferry)
    b_wall = median(s.wall_ms for s in floor)
    q_wall = median(s.quit_ms for s in floor)
    names: list[str] = []
    for s in ferry:
        names += [p["phase"] for p in s.phases if p["phase"] not in names]
    phases = {n: median(p["elapsed_ms"] for s in ferry for p in s.phases if p["phase"] == n)
              for n in names}
    outside = median(s.wall_ms - sum(p["elapsed_ms"] for p in s.phases) for s in ferry)
    f_rest = median(s.wall_ms - s.time_elapsed_ms for s in ferry if s.time_elapsed_ms is not None)
    b_rest = median(s.wall_ms - s.total_time_ms for s in floor if s.total_time_ms is not None)
    # Interleaved pairs: the median of each pair's difference is robust to the transfer
    # time's swings that move both medians (QEMU's time is bimodal on this VM).
    paired = median(a.wall_ms - b.wall_ms for a, b in zip(ferry, floor, strict=True))
    paired_q = median(a.wall_ms - b.quit_ms for a, b in zip(ferry, floor, strict=True))
    return {
        "runs": len(ferry),
        "paired_overhead_ms": paired,
        "paired_ratio": 1 + paired / b_wall if paired is not None and b_wall else None,
        "paired_overhead_vs_quit_ms": paired_q,
        "paired_ratio_vs_quit": 1 + paired_q / q_wall if paired_q is not None and q_wall
        else None,
        "ferry_wall_ms": f_wall,
        "floor_wall_ms": b_wall,
        "ratio": f_wall / b_wall if f_wall and b_wall else None,
        "overhead_ms": f_wall - b_wall if f_wall is not None and b_wall is not None else None,
        "ferry_wall_min_max_ms": [min(s.wall_ms for s in ferry), max(s.wall_ms for s in ferry)],
        "floor_wall_min_max_ms": [min(s.wall_ms for s in floor), max(s.wall_ms for s in floor)],
        "ferry_downtime_ms": median(s.downtime_ms for s in ferry),
        "floor_downtime_ms": median(s.downtime_ms for s in floor),
        "ferry_qemu_time_elapsed_ms": median(s.time_elapsed_ms for s in ferry),
        "floor_qemu_total_time_ms": median(s.total_time_ms for s in floor),
        "floor_until_source_quit_ms": median(s.quit_ms for s in floor),
        # ferry's wall includes Confirm, which ends the source QEMU: the floor's own
        # migration including that quit is the same work.
        "overhead_vs_quit_ms": f_wall - q_wall if f_wall is not None and q_wall else None,
        "ratio_vs_quit": f_wall / q_wall if f_wall and q_wall else None,
        "ferry_outside_qemu_ms": f_rest,
        "floor_outside_qemu_ms": b_rest,
        "overhead_outside_qemu_ms": f_rest - b_rest
        if f_rest is not None and b_rest is not None else None,
        "ferry_phase_ms": phases,
        "ferry_outside_phases_ms": outside,
    }


def case_json(name: str, memory_mib: int, random_mib: int,
              samples: Sequence[tuple[FerrySample, FloorSample, int]], warmup: int,
              floor_downtime_limit_ms: int | None) -> dict[str, Any]:
    """The case with every sample; the first `warmup` pairs are reported, not summarized."""
    counted = samples[warmup:]
    return {"case": name, "memory_mib": memory_mib, "random_mib": random_mib,
            "warmup": warmup, "floor_downtime_limit_ms": floor_downtime_limit_ms,
            "summary": summarize([a for a, _, _ in counted], [b for _, b, _ in counted]),
            "samples": [{"i": i, "warmup": i < warmup, "foreign_qemu": n,
                         "ferry": asdict(a), "floor": asdict(b)}
                        for i, (a, b, n) in enumerate(samples)]}


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    m, opts = result["machine"], result["args"]
    interleave = ("ferry, floor, floor, ferry, ferry, floor, … (abba)"
                  if opts.get("order") == "abba" else "ferry, floor, ferry, floor, …")
    out = [
        "## bench",
        "",
        f"`python -m scripts.bench --runs {opts['runs']} --warmup {opts['warmup']} --sizes "
        f"{','.join(str(x) for x in opts['sizes'])} "
        f"--floor-downtime {opts['floor_downtime']} --order {opts.get('order', 'abab')}` "
        f"on {m['date']}: "
        f"{m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, {m['qemu']}, "
        f"Python {m['python']}; load average at start {m['loadavg_start'][0]:.2f}.",
        "",
        "Guests run under **TCG** (`<domain type='qemu'>`, `accel=tcg`), for ferry and the "
        "floor alike: /dev/kvm here is PVM, which runs the non-paged test guest at ~1 MIPS. "
        "Each case: one guest per side with 512 MiB of random memory per GiB (filled before "
        f"sampling), samples interleaved {interleave} and each sample migrates back the way the "
        "previous one came. ferry: `Client.migrate(live=True).wait()` (managed "
        "v3, bandwidth unlimited), wall time in the caller. floor: the same QEMU argv driven by "
        "hand over QMP, from starting the incoming QEMU to `cont` on the dest (\"floor\"), "
        "and on until the source QEMU has quit (\"floor with source quit\": the same work as "
        "ferry's, whose Confirm ends the source QEMU before `wait()` returns). Downtime is "
        "QEMU's `downtime` (ms). The floor sets the same QEMU parameters ferry sets (events, "
        "max-bandwidth 2^40 B/s, and ferry's initial downtime-limit unless said otherwise "
        "below). Warm-up pairs are listed but not in the medians.",
        "",
        "| case | runs | ferry wall ms | floor wall ms | ferry/floor | overhead ms "
        "| floor with source quit ms | ferry/floor with quit | overhead ms "
        "| ferry downtime ms | floor downtime ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in result["cases"]:
        s = c["summary"]
        ratio = "n/a" if s["ratio"] is None else f"{s['ratio']:.2f}x"
        out.append(
            f"| {c['case']}, {c['memory_mib']} MiB ({c['random_mib']} MiB random) | {s['runs']} "
            f"| {_ms(s['ferry_wall_ms'])} | {_ms(s['floor_wall_ms'])} | {ratio} "
            f"| {_ms(s['overhead_ms'])} | {_ms(s.get('floor_until_source_quit_ms'))} "
            f"| {_x(s.get('ratio_vs_quit'))} | {_ms(s.get('overhead_vs_quit_ms'))} "
            f"| {_ms(s['ferry_downtime_ms'])} "
            f"| {_ms(s['floor_downtime_ms'])} |")
    out += ["", "The same from the pairs: the median of each pair's difference (ferry wall "
            "minus floor wall, in the same pair), and the ratio it gives over the floor's "
            "median; steadier than the ratio of two medians when QEMU's transfer time swings "
            "(below):", "",
            "| case | paired overhead ms | ratio | paired overhead vs floor with quit ms "
            "| ratio |", "| --- | ---: | ---: | ---: | ---: |"]
    for c in result["cases"]:
        s = c["summary"]
        out.append(f"| {c['memory_mib']} MiB | {_ms(s.get('paired_overhead_ms'))} "
                   f"| {_x(s.get('paired_ratio'))} "
                   f"| {_ms(s.get('paired_overhead_vs_quit_ms'))} "
                   f"| {_x(s.get('paired_ratio_vs_quit'))} |")
    out += ["", "QEMU's transfer time varies a lot from sample to sample on this machine (see "
            "below), so the same medians without it: wall minus QEMU's migration time (ferry: "
            "time_elapsed, floor: total-time), i.e. what each side adds around QEMU's transfer:",
            "", "| case | ferry wall minus QEMU ms | floor wall minus QEMU ms | overhead ms |",
            "| --- | ---: | ---: | ---: |"]
    for c in result["cases"]:
        s = c["summary"]
        out.append(f"| {c['memory_mib']} MiB | {_ms(s['ferry_outside_qemu_ms'])} "
                   f"| {_ms(s['floor_outside_qemu_ms'])} | {_ms(s['overhead_outside_qemu_ms'])} |")
    out += ["", "Medians. ferry's phases (per-phase medians, ms, as the summary's `phases` "
            "reports them) and the time outside them (Celery hand-offs, client):", ""]
    for c in result["cases"]:
        s = c["summary"]
        names = list(s["ferry_phase_ms"])
        lim = c["floor_downtime_limit_ms"]
        limit = "QEMU's default" if lim is None else f"{lim} ms"
        out += [f"**{c['memory_mib']} MiB** (floor downtime-limit {limit}): QEMU's own "
                "migration time: ferry "
                f"{_ms(s['ferry_qemu_time_elapsed_ms'])} ms (time_elapsed), floor "
                f"{_ms(s['floor_qemu_total_time_ms'])} ms (total-time); floor until the source "
                f"QEMU has quit: {_ms(s['floor_until_source_quit_ms'])} ms.", "",
                "| " + " | ".join([*names, "outside phases"]) + " |",
                "|" + " ---: |" * (len(names) + 1),
                "| " + " | ".join(_ms(s["ferry_phase_ms"][n]) for n in names)
                + f" | {_ms(s['ferry_outside_phases_ms'])} |", ""]
    out += ["Every sample (ms; ferry's QEMU time is time_elapsed, the floor's total-time):", "",
            "| case | # | ferry | wall | QEMU | downtime | floor | wall | QEMU | downtime |",
            "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    busy = 0
    for c in result["cases"]:
        for row in c["samples"]:
            a, b = row["ferry"], row["floor"]
            busy += bool(row["foreign_qemu"])
            num = "warm-up" if row["warmup"] else str(row["i"] - c["warmup"] + 1)
            out.append(f"| {c['memory_mib']} MiB | {num} | {a['direction']} "
                       f"| {a['wall_ms']:.0f} | {_ms(a['time_elapsed_ms'])} "
                       f"| {_ms(a['downtime_ms'])} | {b['direction']} | {b['wall_ms']:.0f} "
                       f"| {_ms(b['total_time_ms'])} | {_ms(b['downtime_ms'])} |")
    if busy:
        out += ["", f"Warning: in {busy} sample pair(s) other QEMU processes (not this "
                "benchmark's) were running on this machine before or after the pair; their "
                "figures are noisy."]
    notes = result.get("notes")
    if notes:
        out += ["", *notes]
    return "\n".join(out) + "\n"


def resummarize(result: dict[str, Any]) -> dict[str, Any]:
    """A saved floor-case result with its summaries computed again from its samples (a
    report written by an older harness gets the figures added since)."""
    for c in result["cases"]:
        counted = [x for x in c["samples"] if not x["warmup"]]
        c["summary"] = summarize([FerrySample(**x["ferry"]) for x in counted],
                                 [FloorSample(**x["floor"]) for x in counted])
    return result
