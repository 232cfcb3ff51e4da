"""`python -m scripts.bench.sentinel`: migration wall time, Sentinel broker against plain Redis.

Two local ferries side by side on this machine: one on a single redis-server
(`redis://`), one on a Redis master, a replica and three sentinels
(`sentinel://...;...`), each with hosts of its own and one guest.  The guests
are moved to and fro in interleaved pairs (plain, then Sentinel, then the
other way round in the next pair), one managed v3 live migration per sample,
the wall time measured around `Client.migrate(...).wait()`.  The Sentinel
side pays for the discovery of the master on each new connection and for
WAIT 1 on its guarded writes (lease hand-over, Finish claim, phase changes);
the report gives both medians, their ratio (the target is <= 1.05), the median
of the pairs' own ratios, and the machine's load average (a loaded machine
swings single migrations by 2x: compare runs of the same load only).

Raw samples go to scripts/bench/results/sentinel-<timestamp>.json; every
process started here is stopped by pid, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from config.settings import load
from scripts.testbed.guestimage import build_image
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import Stack, searchable
from tasks.client import Client

BENCH_DIR = Path(__file__).resolve().parent
TIMEOUT_S = 300.0


@dataclass
class Side:
    """One ferry (broker and two hosts) and its guest."""

    label: str
    stack: Stack
    hosts: tuple[str, str]
    client: Client | None = None
    guest: str = ""
    at: str = ""
    walls_ms: list[float] = field(default_factory=list)

    def start(self, sentinel: bool, ports: tuple[int, int]) -> None:
        self.stack.extra_env["FERRY_MIGRATION_PORTS"] = f"{ports[0]}-{ports[1]}"
        if sentinel:
            self.stack.start_sentinel()
        else:
            self.stack.start_redis()
        for name in self.hosts:
            self.stack.start_worker(name, wait=False)
        for name in self.hosts:
            proc = self.stack.workers[name].proc
            assert proc is not None
            self.stack.wait_alive(name, proc.pid)
        self.client = Client(load(self.stack.env()))

    def boot(self, image: Path, memory_mib: int, domain_type: str) -> None:
        assert self.client is not None
        self.guest = f"b-{uuidlib.uuid4().hex[:8]}"
        disk = self.stack.root / f"{self.guest}.img"
        shutil.copyfile(image, disk)
        xml = guest_xml(self.guest, disk, self.stack.root / f"{self.guest}.serial",
                        memory_mib=memory_mib, domain_type=domain_type)
        self.at = self.hosts[0]
        self.client.call(self.at, "define", xml=xml)
        self.client.call(self.at, "start", domain=self.guest)

    def migrate(self) -> float:
        """One live migration to the other host; its wall time in ms."""
        assert self.client is not None
        dest = self.hosts[1] if self.at == self.hosts[0] else self.hosts[0]
        started = time.perf_counter()
        summary = self.client.migrate(self.guest, self.at, dest, live=True).wait(
            timeout=TIMEOUT_S)
        wall = (time.perf_counter() - started) * 1000
        if summary.get("result") != "completed":
            raise RuntimeError(f"{self.label}: migration did not complete: {summary}")
        self.at = dest
        self.walls_ms.append(wall)
        return wall


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.sentinel", description=__doc__)
    p.add_argument("--runs", type=int, default=10, help="samples per side (default 10)")
    p.add_argument("--memory", type=int, default=128, help="guest memory, MiB (default 128)")
    p.add_argument("--warmup", type=int, default=1,
                   help="migrations per side before measuring (default 1)")
    p.add_argument("--port-base", type=int,
                   default=int(os.environ.get("FERRY_TEST_PORT_BASE", "30000")) + 700,
                   help="first migration port; each side takes 10")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                   help="directory for sentinel-<timestamp>.json")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, object]:
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-bs-", dir="/tmp")))
    plain = Side("redis://", Stack(root=root / "plain"), ("bp-alpha", "bp-beta"))
    sent = Side("sentinel://", Stack(root=root / "sentinel"), ("bs-alpha", "bs-beta"))
    domain_type = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
    try:
        image = build_image(root / "bench.img", dirty_mib=4, rate_mib_s=4)
        plain.start(False, (args.port_base, args.port_base + 9))
        sent.start(True, (args.port_base + 10, args.port_base + 19))
        for side in (plain, sent):
            side.boot(image, args.memory, domain_type)
            for _ in range(args.warmup):
                side.migrate()
            side.walls_ms.clear()
        for i in range(args.runs):
            order = (plain, sent) if i % 2 == 0 else (sent, plain)
            for side in order:
                side.migrate()
    finally:
        for side in (plain, sent):
            with contextlib.suppress(Exception):
                side.stack.stop(kill_guests=True)
        shutil.rmtree(root, ignore_errors=True)
    med_plain = statistics.median(plain.walls_ms)
    med_sent = statistics.median(sent.walls_ms)
    pairs = [s / p for p, s in zip(plain.walls_ms, sent.walls_ms, strict=True)]
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "runs": args.runs,
            "memory_mib": args.memory, "domain_type": domain_type,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "pair_ratio_median": round(statistics.median(pairs), 3),
            "plain_ms": [round(w, 1) for w in plain.walls_ms],
            "sentinel_ms": [round(w, 1) for w in sent.walls_ms],
            "plain_median_ms": round(med_plain, 1), "sentinel_median_ms": round(med_sent, 1),
            "ratio": round(med_sent / med_plain, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"sentinel-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['date']}: {result['runs']} interleaved pairs, {result['memory_mib']} MiB "
          f"{result['domain_type']} guest: redis:// median {result['plain_median_ms']} ms, "
          f"sentinel:// median {result['sentinel_median_ms']} ms, ratio {result['ratio']} "
          f"(median of the pairs' ratios {result['pair_ratio_median']}; load average "
          f"{result['load_average']}; raw: {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
