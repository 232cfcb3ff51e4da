"""`python -m scripts.bench.tls` (`python -m scripts.bench --case tls`): migration TLS
against plain TCP and against the stream tunnelled through a rediss:// broker.

A local ferry whose Redis speaks only TLS (so `--tunnelled` is encrypted too),
hosts alpha and beta with certificates from `ferry tls-init`'s code, and one
guest of 1 GiB with 768 MiB random (TCG).  Every round migrates it once with
each variant, the order rotated from round to round (A B C, B C A, C A B):

    plain       managed v3, QEMU's tcp stream in the clear
    tls         managed v3 --tls: QEMU's own TLS (tls-creds-x509)
    tunnelled   p2p --tunnelled: the stream through the rediss:// broker

and with `--parallel` also

    tls-parallel  managed v3 --tls --parallel --parallel-connections 2: multifd,
                  every channel its own TLS session (its own thread on each end)

Per sample: the wall time around `Client.migrate(...).wait()`, QEMU's own
migration time and memory processed (throughput = processed / QEMU's time)
and QEMU's bandwidth figure.  Ratios are given of the medians and as the
median of the per-round ratios (paired).  Before the rounds, a small guest is
migrated with TLS under a loopback capture and the ServerHello says which
protocol and cipher suite were negotiated.  `--priority` sets
FERRY_MIGRATION_TLS_PRIORITY on both hosts (e.g. NORMAL:-CIPHER-ALL:+AES-128-GCM).
Raw samples go to scripts/bench/results/<timestamp>-tls.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from config.settings import load
from scripts.bench.migration import FerryGuest, wait_filled
from scripts.cli import tls_init
from scripts.testbed.capture import server_hello
from scripts.testbed.guestimage import build_image
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import RedisTls, Stack, searchable, stop_pid, wait_for
from tasks.client import Client

BENCH_DIR = Path(__file__).resolve().parent
MEMORY_MIB, RANDOM_MIB, MIB = 1024, 768, 1 << 20
PLAIN, TLS, TUNNELLED, TLS_PARALLEL = "plain", "tls", "tunnelled", "tls-parallel"
VARIANTS = (PLAIN, TLS, TUNNELLED)
OPTIONS: dict[str, dict[str, Any]] = {
    PLAIN: {}, TLS: {"tls": True}, TUNNELLED: {"p2p": True, "tunnelled": True},
    TLS_PARALLEL: {"tls": True, "parallel": True, "parallel_connections": 2}}
RATIOS = ((TLS, PLAIN, "throughput_mib_s"), (TLS, PLAIN, "wall_ms"),
          (TLS, TUNNELLED, "throughput_mib_s"), (TLS, TUNNELLED, "wall_ms"),
          (TLS_PARALLEL, PLAIN, "throughput_mib_s"), (TLS_PARALLEL, PLAIN, "wall_ms"),
          (TLS_PARALLEL, TLS, "throughput_mib_s"))
HOSTS = ("alpha", "beta")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def rotation(i: int, variants: tuple[str, ...] = VARIANTS) -> tuple[str, ...]:
    k = i % len(variants)
    return variants[k:] + variants[:k]


def _median(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    counted = [s for s in samples if not s["warmup"]]
    variants = tuple(dict.fromkeys(s["variant"] for s in samples))
    per = {v: {"runs": len(rows := [s for s in counted if s["variant"] == v]),
               "wall_ms": _median([r["wall_ms"] for r in rows]),
               "qemu_ms": _median([r["qemu_ms"] for r in rows]),
               "throughput_mib_s": _median([r["throughput_mib_s"] for r in rows]),
               "qemu_mib_s": _median([r["qemu_mib_s"] for r in rows]),
               "downtime_ms": _median([r["downtime_ms"] for r in rows])}
           for v in variants}
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for s in counted:
        by_round.setdefault(s["round"], {})[s["variant"]] = s
    ratios = []
    for num, den, figure in RATIOS:
        if num not in per or den not in per:
            continue
        a, b = per[num][figure], per[den][figure]
        paired = [r[num][figure] / r[den][figure] for r in by_round.values()
                  if num in r and den in r and r[num][figure] and r[den][figure]]
        ratios.append({"ratio": f"{num} / {den}", "figure": figure,
                       "of_medians": a / b if a and b else None,
                       "paired_median": _median(paired), "pairs": len(paired)})
    return {"summary": per, "ratios": ratios}


def _pki(root: Path) -> dict[str, Path]:
    ca = tls_init.make_ca(root / "ca")
    return {h: tls_init.issue_host(ca, root / h, h, ["127.0.0.1"]) for h in HOSTS}


def start(root: Path, priority: str, log_level: str) -> tuple[Stack, Client]:
    """A rediss:-only redis-server and hosts alpha and beta with their TLS dirs."""
    pki = _pki(root / "pki")
    stack = Stack(root=root / "stack", log_level=log_level)
    stack.root.mkdir()
    a = pki[HOSTS[0]]  # its server certificate names 127.0.0.1: good for Redis too
    stack.start_redis(tls=RedisTls(a / "server-cert.pem", a / "server-key.pem",
                                   a / "ca-cert.pem"))
    if priority:
        stack.extra_env["FERRY_MIGRATION_TLS_PRIORITY"] = priority
    for h in HOSTS:
        stack.start_worker(h, env={"FERRY_TLS_DIR": str(pki[h])})
    client = Client(load(stack.env()))
    return stack, client


@contextlib.contextmanager
def _captured(stack: Stack, out: Path) -> Iterator[Path]:
    low, high = stack.settings().migration_ports
    proc = subprocess.Popen([sys.executable, "-m", "scripts.testbed.capture", "--ports",
                             f"{low}-{high}", "--out", str(out)], stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: (out / "ready").exists() or proc.poll() is not None, 10,
                 "the capture to start")
        yield out
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            stop_pid(proc.pid)


def probe_cipher(stack: Stack, client: Client, work: Path) -> dict[str, str] | None:
    """One TLS migration of a small guest under capture: the ServerHello's choice."""
    disk = work / "probe.img"
    build_image(disk, rate_mib_s=0)
    xml = guest_xml("bench-tls-probe", disk, work / "probe.serial", memory_mib=64,
                    domain_type="qemu")
    guest = FerryGuest(client, "bench-tls-probe", xml)
    try:
        guest.start()
        with _captured(stack, work / "probe-capture") as out:
            guest.migrate(tls=True)
        low, high = stack.settings().migration_ports
        for flow in out.glob("*.bin"):
            if low <= int(flow.stem.split("-")[0]) <= high:  # the dest's side: ServerHello
                hello = server_hello(flow.read_bytes())
                if hello is not None:
                    return {"version": hello[0], "cipher": hello[1]}
        return None
    finally:
        guest.remove()


def run(client: Client, work: Path, runs: int, warmup: int,
        fill_timeout: float, variants: tuple[str, ...] = VARIANTS) -> list[dict[str, Any]]:
    image = build_image(work / "guest.img", random_mib=RANDOM_MIB, rate_mib_s=0)
    xml = guest_xml("bench-tls", image, work / "guest.serial", memory_mib=MEMORY_MIB,
                    domain_type="qemu")
    guest = FerryGuest(client, "bench-tls", xml)
    samples: list[dict[str, Any]] = []
    try:
        guest.start()
        wait_filled(work / "guest.serial", fill_timeout, "the guest to fill its memory")
        for i in range(warmup + runs):
            for pos, variant in enumerate(rotation(i - warmup, variants)):
                s = guest.migrate(**OPTIONS[variant])
                rec = {"round": i, "position": pos, "variant": variant,
                       "warmup": i < warmup, "direction": s.direction,
                       "wall_ms": s.wall_ms, "qemu_ms": s.time_elapsed_ms,
                       "downtime_ms": s.downtime_ms, "memory_processed": s.memory_processed,
                       "qemu_mib_s": s.memory_bps / MIB if s.memory_bps else None,
                       "throughput_mib_s": s.memory_processed / MIB / (s.time_elapsed_ms / 1000)
                       if s.memory_processed and s.time_elapsed_ms else None}
                samples.append(rec)
                _log(f"[tls] {'warm-up' if i < warmup else f'{i - warmup + 1}/{runs}'} "
                     f"{variant:<10} {s.direction}: wall {s.wall_ms:.0f} ms, QEMU "
                     f"{s.time_elapsed_ms} ms, {rec['throughput_mib_s'] or 0:.0f} MiB/s")
    finally:
        guest.remove()
    return samples


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [f"## {result['date']}: {a['runs']} rounds, priority "
             f"{a['priority'] or '(QEMU default)'}",
             "", f"Negotiated: {result['cipher'] or 'not seen'}", "",
             "| variant | runs | wall ms | QEMU ms | throughput MiB/s | QEMU MiB/s | downtime ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v, s in result["summary"].items():
        lines.append(f"| {v} | {s['runs']} | {s['wall_ms'] or 0:.0f} | {s['qemu_ms'] or 0:.0f} "
                     f"| {s['throughput_mib_s'] or 0:.0f} | {s['qemu_mib_s'] or 0:.0f} | "
                     f"{s['downtime_ms'] or 0:.0f} |")
    lines += ["", "| ratio | figure | of medians | paired median |", "| --- | --- | ---: | ---: |"]
    for r in result["ratios"]:
        lines.append(f"| {r['ratio']} | {r['figure']} | {r['of_medians'] or 0:.2f} | "
                     f"{r['paired_median'] or 0:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.tls", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=6, help="counted rounds (default 6)")
    p.add_argument("--warmup", type=int, default=1, help="rounds not counted (default 1)")
    p.add_argument("--priority", default="", help="FERRY_MIGRATION_TLS_PRIORITY of the hosts")
    p.add_argument("--parallel", action="store_true",
                   help="also --tls --parallel (2 connections), ratios against plain and tls")
    p.add_argument("--fill-timeout", type=float, default=900)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep", action="store_true", help="keep the temporary root")
    a = p.parse_args(argv)
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-btls-", dir="/tmp")))
    stack = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        stack, client = start(root, a.priority, a.log_level)
        work = root / "work"
        work.mkdir()
        cipher = probe_cipher(stack, client, work)
        _log(f"[tls] negotiated: {cipher}")
        variants = (*VARIANTS, TLS_PARALLEL) if a.parallel else VARIANTS
        samples = run(client, work, a.runs, a.warmup, a.fill_timeout, variants)
    finally:
        if stack is not None:
            stack.stop(kill_guests=True)
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "args": {"runs": a.runs, "warmup": a.warmup, "priority": a.priority,
                       "parallel": a.parallel},
              "cpus": os.cpu_count(), "memory_mib": MEMORY_MIB, "random_mib": RANDOM_MIB,
              "cipher": f"{cipher['version']} {cipher['cipher']}" if cipher else None,
              **summarize(samples), "samples": samples}
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (a.out / f"{stamp}-tls.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (a.out / f"{stamp}-tls.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
