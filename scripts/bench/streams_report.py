"""Medians, paired ratios and the Markdown of the streams benchmark (scripts/bench/streams.py)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

MIB = 1 << 20
#: (numerator, denominator, figure, {guest: target}, "min" | "max" | ""): what issue 22 asks
RATIOS: tuple[tuple[str, str, str, dict[str, float], str], ...] = (
    ("direct par2", "direct", "throughput_mib_s", {"random": 1.3, "text": 1.3}, "min"),
    ("direct par4", "direct", "throughput_mib_s", {"random": 1.3, "text": 1.3}, "min"),
    ("tunnel", "p2p direct", "throughput_mib_s", {"random": 0.6, "text": 0.6}, "min"),
    ("tunnel par2", "p2p direct", "throughput_mib_s", {"random": 0.6, "text": 0.6}, "min"),
    ("tunnel par4", "p2p direct", "throughput_mib_s", {"random": 0.6, "text": 0.6}, "min"),
    ("tunnel par2", "direct par2", "throughput_mib_s", {}, ""),
    ("tunnel par2", "tunnel", "throughput_mib_s", {}, ""),
    ("cap xbzrle", "cap direct", "wall_ms", {"random": 1.1, "text": 0.6}, "max"),
    ("cap zstd par2", "cap direct", "wall_ms", {"random": 1.1, "text": 0.6}, "max"),
    ("cap par2", "cap direct", "wall_ms", {}, ""),
    ("cap zstd par2", "cap par2", "wall_ms", {}, ""),
    ("floor rp+pbs", "floor", "guest_pause_ms", {}, ""),
    ("direct", "floor", "guest_pause_ms", {}, ""),
    ("tunnel", "floor", "guest_pause_ms", {}, ""),
)
_SUMMARY = {"guest_pause_ms": "pause_ms"}  # a sample's figure -> its summary's median
ROLES = ("qemu src", "qemu dst", "worker src", "worker src tunnel", "worker dst",
         "worker dst tunnel", "redis")


def _median(values: Sequence[float | int | None]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return statistics.median(xs) if xs else None


def _f(v: float | None, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _per_mib(rows: Sequence[dict[str, Any]], role: str) -> float | None:
    """CPU ms per MiB of guest memory processed, median over the samples."""
    return _median([r["cpu_s"].get(role, 0.0) * 1000 / (r["memory_processed"] / MIB)
                    for r in rows if r.get("memory_processed")])


def _variant(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    pauses = [r["guest_pause_ms"] for r in rows if r["guest_pause_ms"] is not None]
    return {
        "runs": len(rows),
        "wall_ms": _median([r["wall_ms"] for r in rows]),
        "qemu_ms": _median([r["qemu_ms"] for r in rows]),
        "throughput_mib_s": _median([r["throughput_mib_s"] for r in rows]),
        "downtime_ms": _median([r["downtime_ms"] for r in rows]),
        "downtime_max_ms": max((r["downtime_ms"] or 0 for r in rows), default=None),
        "pause_ms": _median(pauses),
        "pause_max_ms": max(pauses, default=None),
        "processed_mib": _median([(r["memory_processed"] or 0) / MIB for r in rows]),
        "wire_ratio": _median([r["stream_bytes"] / r["memory_processed"] for r in rows
                               if r.get("stream_bytes") and r.get("memory_processed")]),
        "busy_pct": _median([100 * r["cpu_s"]["machine busy"]
                             / (2 * r["cpu_s"]["elapsed"]) for r in rows
                             if r["cpu_s"].get("elapsed")]),
        "loadavg": _median([r["loadavg"] for r in rows]),
        "cpu_ms_per_mib": {role: _per_mib(rows, role) for role in ROLES},
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    counted = [s for s in result["samples"] if not s["warmup"]]
    guests = result["args"]["guests"]
    variants = result["args"]["variants"]
    per: dict[str, dict[str, Any]] = {
        g: {v: _variant([s for s in counted if s["guest"] == g and s["variant"] == v])
            for v in variants} for g in guests}
    ratios = []
    for g in guests:
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for s in counted:
            if s["guest"] == g:
                by_round.setdefault(s["round"], {})[s["variant"]] = s
        for num, den, figure, targets, kind in RATIOS:
            if num not in variants or den not in variants:
                continue
            key = _SUMMARY.get(figure, figure)
            a, b = per[g][num][key], per[g][den][key]
            paired = [rnd[num][figure] / rnd[den][figure] for rnd in by_round.values()
                      if num in rnd and den in rnd and rnd[num][figure] and rnd[den][figure]]
            value = a / b if a and b else None
            pair = _median(paired)
            target = targets.get(g)
            met = None
            if kind and target is not None and pair is not None:
                met = pair >= target if kind == "min" else pair <= target
            ratios.append({"guest": g, "ratio": f"{num} / {den}", "figure": figure,
                           "of_medians": value, "paired": pair, "target": target,
                           "kind": kind, "met": met})
    return {"per": per, "ratios": ratios}


def markdown(result: dict[str, Any]) -> str:
    m, a, s = result["machine"], result["args"], result["summary"]
    end = m.get("loadavg_end", [None])[0]
    out = [
        "## streams",
        "",
        f"`python -m scripts.bench.streams --runs {a['runs']} --warmup {a['warmup']} --net "
        f"{a['net']}` on {m['date']}: {m['nproc']} CPUs ({m['cpu_model']}), kernel "
        f"{m['kernel']}, {m['qemu']}, Python {m['python']}; load average at start "
        f"{m['loadavg_start'][0]:.2f}, at the end {_f(end, 2)}. **The machine was shared with "
        "other sessions' tests and builds**: read the paired ratios (both variants of a pair "
        "ran back to back), not the absolute figures.",
        "",
        f"TCG guests of {a['memory_mib']} MiB, {a['fill_mib']} MiB filled (random: random "
        "bytes; text: 5/8 hex text and 3/8 zeros per page, 3.1:1 under zstd -1), rewriting "
        f"{a['dirty'][0]} MiB at {a['dirty'][1]} MiB/s; "
        + ("two namespace hosts (veth links over a bridge; Redis on a second bridge); capped "
           f"variants: `tc qdisc ... tbf rate {a['cap']}` on the source's data link. "
           if a["net"] == "fleet" else "a local ferry over 127.0.0.1. ")
        + f"Tunnel window {a['tunnel']['window_mib']} MiB per channel, chunk "
        f"{a['tunnel']['chunk_kib']} KiB. Medians of {a['runs']} rounds. Throughput = memory "
        "processed / QEMU's time; pause = QEMU's STOP on the source to RESUME on the dest "
        "(median and longest); wire = bytes through the tunnel / memory processed.",
        "",
    ]
    for g in a["guests"]:
        out += [f"### {g} guest", "",
                "| variant | runs | wall ms | QEMU ms | MiB/s | downtime ms (max) "
                "| pause ms (max) | wire | busy % | load |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for v in a["variants"]:
            r = s["per"][g][v]
            out.append(
                f"| {v} | {r['runs']} | {_f(r['wall_ms'])} | {_f(r['qemu_ms'])} "
                f"| {_f(r['throughput_mib_s'])} | {_f(r['downtime_ms'])} "
                f"({_f(r['downtime_max_ms'])}) | {_f(r['pause_ms'], 1)} "
                f"({_f(r['pause_max_ms'], 1)}) | {_f(r['wire_ratio'], 2)} "
                f"| {_f(r['busy_pct'])} | {_f(r['loadavg'], 1)} |")
        out += ["", "CPU ms per MiB of guest memory, per process (tunnel = the workers' "
                "ferry-tun* threads):", "",
                "| variant | " + " | ".join(ROLES) + " |",
                "| --- |" + " ---: |" * len(ROLES)]
        for v in a["variants"]:
            c = s["per"][g][v]["cpu_ms_per_mib"]
            out.append(f"| {v} | " + " | ".join(_f(c[role], 2) for role in ROLES) + " |")
        out.append("")
    out += ["### ratios", "",
            "| guest | ratio | of | of medians | paired median | target | met |",
            "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in s["ratios"]:
        sign = {"min": "≥ ", "max": "≤ "}.get(r["kind"], "")
        target = f"{sign}{r['target']:.2f}" if r["target"] is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        figure = {"wall_ms": "wall", "throughput_mib_s": "throughput",
                  "guest_pause_ms": "pause"}[r["figure"]]
        out.append(f"| {r['guest']} | {r['ratio']} | {figure} | {_f(r['of_medians'], 2)} "
                   f"| {_f(r['paired'], 2)} | {target} | {met} |")
    out.append("")
    return "\n".join(out)
