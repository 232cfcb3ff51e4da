"""The Markdown section of the transports case (scripts/bench/transports.py)."""

from __future__ import annotations

from typing import Any

from scripts.bench.transports import FLOOR


def _f(v: float | None, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _label(figure: str) -> str:
    return {"wall_ms": "wall", "throughput_mib_s": "throughput",
            "outside_qemu_ms": "wall minus QEMU"}.get(figure, figure)


def markdown(result: dict[str, Any]) -> str:
    m, opts, c = result["machine"], result["args"], result["cases"][0]
    variants: list[str] = c["variants"]
    lim = c["floor_downtime_limit_ms"]
    tun = opts.get("tunnel") or {}
    out = [
        "## transports",
        "",
        f"`python -m scripts.bench --case transports --runs {opts['runs']} --warmup "
        f"{opts['warmup']} --floor-downtime {opts['floor_downtime']}` on {m['date']}: "
        f"{m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, {m['qemu']}, "
        f"Python {m['python']}; load average at start {m['loadavg_start'][0]:.2f}, at the end "
        f"{_f(m.get('loadavg_end', [None])[0], 2)}.",
        "",
        f"One TCG guest of {c['memory_mib']} MiB with {c['random_mib']} MiB of random memory "
        "(filled before sampling, not dirtied afterwards) on a local ferry (redis, hosts alpha "
        "and beta), moved by the three ferry variants in turn, and its twin moved by the floor. "
        "Each round runs every variant once, the order rotated by one from round to round "
        f"({', '.join(variants)}; then starting with {variants[1]}; ...), each migration goes "
        "to the other host; after every 4 rounds one more managed migration, not counted, "
        "swaps the host the next round starts on, so that 8 rounds give every variant each "
        "position twice and each direction 4 times. managed direct: "
        "`Client.migrate(live=True)` (v3 chain); p2p direct: `p2p=True`; p2p tunnelled: "
        "`p2p=True, tunnelled=True` (QEMU's stream through Redis); floor: the same QEMU argv "
        "over QMP, tcp, from starting the incoming QEMU to `cont` on the dest. Wall time in the "
        "caller around `.wait()`. QEMU time: ferry's statistics `time_elapsed`, the floor's "
        "`total-time`; throughput = memory processed (QEMU's `ram.transferred`) / QEMU time; "
        "QEMU MiB/s = QEMU's own `mbps` (ferry: `memory_bps`). Downtime: QEMU's `downtime`. "
        "Floor downtime-limit: "
        f"{'QEMU default' if lim is None else f'{lim} ms'} (ferry's first step). "
        f"Medians of {opts['runs']} rounds; {opts['warmup']} warm-up round(s) listed below, "
        "not counted. Tunnel: window "
        f"{tun.get('window_mib', '?')} MiB, chunk {tun.get('chunk_kib', '?')} KiB, redis-py "
        f"parser {'hiredis' if tun.get('hiredis') else 'pure Python'}.",
        "",
        "| variant | runs | wall ms | wall min-max ms | QEMU ms | wall minus QEMU ms "
        "| throughput MiB/s | QEMU MiB/s | downtime ms | processed MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v in variants:
        s = c["summary"][v]
        lo_hi = s["wall_min_max_ms"] or [None, None]
        out.append(f"| {v} | {s['runs']} | {_f(s['wall_ms'])} | {_f(lo_hi[0])}-{_f(lo_hi[1])} "
                   f"| {_f(s['qemu_ms'])} | {_f(s['outside_qemu_ms'])} "
                   f"| {_f(s['throughput_mib_s'])} | {_f(s['qemu_mib_s'])} "
                   f"| {_f(s['downtime_ms'])} | {_f(s['memory_processed_mib'])} |")
    out += ["", "Ratios: of the medians above, and the median of the per-round ratios (both "
            "variants of a round ran back to back, so the pairing cancels slow phases of the "
            "machine):", "",
            "| ratio | of | of medians | per-round median | target | met |",
            "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in c["ratios"]:
        target = ("" if r["kind"] is None
                  else ("≥ " if r["kind"] == "min" else "≤ ") + f"{r['target']:.2f}")
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        out.append(f"| {r['ratio']} | {_label(r['figure'])} | {_f(r['of_medians'], 2)} "
                   f"| {_f(r['paired_median'], 2)} | {target} | {met} |")
    ferry_variants = [v for v in variants if v != FLOOR]
    names: list[str] = []
    for v in ferry_variants:
        names += [n for n in c["summary"][v]["phase_ms"] if n not in names]
    out += ["", "ferry's phases (medians, ms, as the summary's `phases` reports them; p2p runs "
            "them inside one task on the source) and the wall time outside them:", "",
            "| variant | " + " | ".join([*names, "outside phases"]) + " |",
            "| --- |" + " ---: |" * (len(names) + 1)]
    for v in ferry_variants:
        s = c["summary"][v]
        out.append(f"| {v} | " + " | ".join(_f(s["phase_ms"].get(n)) for n in names)
                   + f" | {_f(s['outside_phases_ms'])} |")
    out += _cpu_table(c, m["nproc"])
    out += ["", "Every sample (ms, MiB/s):", "",
            "| round | # | variant | direction | wall | QEMU | throughput | downtime |",
            "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    busy = set()
    for r in c["samples"]:
        if r["foreign_qemu"]:
            busy.add(r["round"])
        rnd = str(r["round"] - c["warmup"] + 1)
        if r["warmup"]:
            rnd = "warm-up" if r["round"] < c["warmup"] else f"{rnd} (reposition)"
        out.append(f"| {rnd} | {r['position'] + 1} | {r['variant']} | {r['direction']} "
                   f"| {r['wall_ms']:.0f} | {_f(r['qemu_ms'])} | {_f(r['throughput_mib_s'])} "
                   f"| {_f(r['downtime_ms'])} |")
    if busy:
        out += ["", f"Warning: in {len(busy)} round(s) other QEMU processes (not this "
                "benchmark's) were running on this machine; their figures are noisy."]
    return "\n".join(out) + "\n"


CPU_COLUMNS = ("qemu src", "qemu dst", "worker src", "worker src tunnel", "worker dst",
               "worker dst tunnel", "redis", "bench client", "qemu idle", "other processes")


def _cpu_table(c: dict[str, Any], nproc: int) -> list[str]:
    """Medians of the CPU seconds per process during one migration (scripts/bench/cpu.py)."""
    if not any(c["summary"][v]["cpu_s"] for v in c["variants"]):
        return []
    out = ["", "CPU seconds during one migration, medians (from /proc, sampled every 0.1 s "
           "from the call to its return; \"tunnel\" = the worker's ferry-tunnel threads, "
           "counted apart from the rest of the worker; the floor's QMP driver is the bench "
           "client; busy % = machine busy / (CPUs x elapsed)):", "",
           "| variant | elapsed s | machine busy s | busy % | " + " | ".join(CPU_COLUMNS) + " |",
           "| --- |" + " ---: |" * (3 + len(CPU_COLUMNS))]
    for v in c["variants"]:
        cpu = c["summary"][v]["cpu_s"]
        if not cpu:
            continue
        busy, elapsed = cpu.get("machine busy"), cpu.get("elapsed")
        pct = 100 * busy / (nproc * elapsed) if busy and elapsed else None
        out.append(f"| {v} | {_f(elapsed, 2)} | {_f(busy, 2)} | {_f(pct)} | "
                   + " | ".join(_f(cpu.get(k, 0.0), 2) for k in CPU_COLUMNS) + " |")
    return out
