"""`python -m scripts.bench.storage`: ferry's storage copy against its floor (STORAGE.md).

A guest with a 2 GiB qcow2 disk holding 1 GiB of random data moves alpha <->
beta with `--copy-storage-all` (both hosts on this machine, each move to a
fresh image path on the dest).  The floor moves the same bytes over the same
path by hand: a QEMU started with a fresh 2 GiB qcow2 on the dest side, its NBD
server and a writable export (what ferry's Prepare sets up), and
`qemu-img convert -n --target-is-zero -W` (out-of-order writes, as a mirror
makes) from a copy of the source image into that export.  Samples interleave
(ferry, floor, ferry, ...) after a warm-up of each; medians and their ratio:
ferry's bulk copy (mirrors started to all in sync, `disk_copy_ms`) over the
floor's convert; ferry's whole migration (RAM and disks together, every phase)
is reported beside it.  Every process is stopped by pid, also on failure.

`--mirror`: the hosts run with FERRY_STORAGE_RESUMABLE=0 (mirrors only, the copy
before backup rounds became the default), written to STORAGE-MIRROR.md.

`--retry`: the sources run with FERRY_STORAGE_RESUMABLE=1; each sample cuts a copy
(an abort) once half the disk went, then retries it to the same dest: the bytes the
retry copied over the bytes of an uninterrupted copy (`disk_processed` of the retry,
and the disk's virtual size, which a full backup sends, zeroes as zero writes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from scripts.bench.migration import start_stack
from scripts.bench.report import machine
from scripts.testbed.guestimage import build_image
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import Stack, free_port, searchable, stop_pid, wait_for
from tasks.client import Client

BENCH_DIR = Path(__file__).resolve().parent
DISK_GIB, RANDOM_GIB = 2, 1
CHUNK = 64 << 20


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_disk(root: Path, disk_gib: int = DISK_GIB, random_gib: int = RANDOM_GIB) -> Path:
    """The test guest's boot code, then `random_gib` GiB of random data from 256 MiB on,
    in a `disk_gib` GiB qcow2 (64 KiB clusters)."""
    raw = build_image(root / "disk.raw", size=disk_gib << 30, rate_mib_s=0)
    with open(raw, "r+b") as f:
        f.seek(256 << 20)
        for _ in range((random_gib << 30) // CHUNK):
            f.write(os.urandom(CHUNK))
    out = root / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
                   check=True)
    raw.unlink()
    return out


def qemu_img_create(path: Path, size: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                   check=True)


class Floor:
    """The same bytes over the same path by hand: an NBD export of a fresh qcow2 in a
    QEMU, written by qemu-img convert."""

    def __init__(self, root: Path, source: Path) -> None:
        self.root, self.source = root, source
        self.size = json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", str(source)], check=True,
            capture_output=True, text=True).stdout)["virtual-size"]

    def sample(self) -> dict[str, float]:
        target = self.root / "floor-dest.qcow2"
        qemu_img_create(target, self.size)
        sock = self.root / "floor.qmp"
        proc = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
             "-qmp", f"unix:{sock},server=on,wait=off",
             "-blockdev", f"driver=qcow2,node-name=disk0,file.driver=file,"
                          f"file.filename={target}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            wait_for(sock.exists, 30, "the floor QEMU's monitor")
            qmp = QEMUMonitorProtocol(str(sock))
            qmp.connect()
            port = free_port()
            qmp.cmd("nbd-server-start", addr={"type": "inet", "data": {
                "host": "127.0.0.1", "port": str(port)}})
            qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "disk0"},
                    name="disk0", writable=True)
            t0 = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-n", "--target-is-zero", "-W", "-f",
                            "qcow2", "-O", "raw", str(self.source),
                            f"nbd://127.0.0.1:{port}/disk0"], check=True)
            convert_ms = (time.perf_counter() - t0) * 1000
            qmp.cmd("nbd-server-stop")
            with contextlib.suppress(Exception):  # QEMU may close the socket first
                qmp.cmd("quit")
                qmp.close()
        finally:
            stop_pid(proc.pid)
            proc.wait(timeout=10)
            target.unlink(missing_ok=True)
        return {"convert_ms": convert_ms}


class FerrySide:
    """A guest on alpha; each sample moves it to the other host with a storage copy, to
    a path the previous move freed."""

    def __init__(self, client: Client, root: Path, template: Path) -> None:
        self.client, self.root = client, root
        self.paths = {"alpha": root / "alpha" / "disk.qcow2", "beta": root / "beta" / "disk.qcow2"}
        for p in self.paths.values():
            p.parent.mkdir(exist_ok=True)
        shutil.copyfile(template, self.paths["alpha"])
        self.name, self.at = "bench-storage", "alpha"
        dom_uuid = str(uuid.uuid4())
        self.xml = {h: guest_xml(self.name, p, root / "guest.serial", memory_mib=64,
                                 domain_type="qemu", disk_format="qcow2", uuid=dom_uuid)
                    for h, p in self.paths.items()}

    def start(self) -> None:
        self.client.call("alpha", "define", xml=self.xml["alpha"])
        self.client.call("alpha", "start", domain=self.name)

    def sample(self) -> dict[str, Any]:
        src = self.at
        dst = "beta" if src == "alpha" else "alpha"
        self.paths[dst].unlink(missing_ok=True)  # the image the guest left two moves ago
        t0 = time.perf_counter()
        summary = self.client.migrate(self.name, src, dst, live=True, copy_storage_all=True,
                                      xmlin=self.xml[dst]).wait(timeout=900)
        wall_ms = (time.perf_counter() - t0) * 1000
        self.at = dst
        stats = summary["statistics"]
        return {"wall_ms": wall_ms, "disk_copy_ms": stats.get("disk_copy_ms"),
                "disk_total": stats.get("disk_total"), "time_elapsed_ms":
                stats.get("time_elapsed"), "downtime_ms": stats.get("downtime"),
                "memory_total": stats.get("memory_total"), "direction": f"{src}->{dst}",
                "phases": {p["phase"]: p["elapsed_ms"] for p in summary["phases"]}}

    def retry_sample(self, cut_bandwidth_mib: int) -> dict[str, Any]:
        """A copy cut (aborted) at half the disk, then its retry to the same dest."""
        src = self.at
        dst = "beta" if src == "alpha" else "alpha"
        self.paths[dst].unlink(missing_ok=True)
        job = self.client.migrate(self.name, src, dst, live=True, copy_storage_all=True,
                                  bandwidth_mib_s=cut_bandwidth_mib, xmlin=self.xml[dst])
        size = DISK_GIB << 30
        wait_for(lambda: (job.info().get("disk_processed") or 0) >= size // 2, 600,
                 "half the disk to be copied")
        cut_at = int(job.info().get("disk_processed") or 0)
        job.abort()
        with contextlib.suppress(Exception):
            job.wait(timeout=120)
        wait_for(lambda: self.client.call(src, "dominfo", domain=self.name)["state"] ==
                 "running", 60, "the source guest to run on")
        t0 = time.perf_counter()
        summary = self.client.migrate(self.name, src, dst, live=True, copy_storage_all=True,
                                      xmlin=self.xml[dst]).wait(timeout=900)
        wall_ms = (time.perf_counter() - t0) * 1000
        self.at = dst
        stats = summary["statistics"]
        return {"cut_at": cut_at, "full": size, "retry_processed": stats["disk_processed"],
                "reused": stats.get("disk_reused", 0), "retry_wall_ms": wall_ms,
                "handover_ms": stats.get("disk_handover_ms"), "direction": f"{src}->{dst}",
                "ratio": round(stats["disk_processed"] / size, 3)}

    def remove(self) -> None:
        for task in ("destroy", "undefine"):
            with contextlib.suppress(Exception):
                self.client.call(self.at, task, domain=self.name, timeout=30)


def median(xs: Sequence[float | None]) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def summarize(ferry: list[dict[str, Any]], floor: list[dict[str, float]],
              copied: int) -> dict[str, Any]:
    f_copy = median([s["disk_copy_ms"] for s in ferry])
    b_copy = median([s["convert_ms"] for s in floor])
    pairs = [a["disk_copy_ms"] / b["convert_ms"] for a, b in zip(ferry, floor, strict=False)
             if a.get("disk_copy_ms")]
    return {"pairs": min(len(ferry), len(floor)),
            "ferry_disk_copy_ms": f_copy, "floor_convert_ms": b_copy,
            "ratio": round(f_copy / b_copy, 3) if f_copy and b_copy else None,
            "median_pair_ratio": round(statistics.median(pairs), 3) if pairs else None,
            "ferry_wall_ms": median([s["wall_ms"] for s in ferry]),
            "ferry_qemu_time_ms": median([s["time_elapsed_ms"] for s in ferry]),
            "ferry_downtime_ms": median([s["downtime_ms"] for s in ferry]),
            "disk_total": median([s["disk_total"] for s in ferry]),
            "ferry_mib_s": round(copied / (1 << 20) / (f_copy / 1000), 1) if f_copy else None,
            "floor_mib_s": round(copied / (1 << 20) / (b_copy / 1000), 1) if b_copy else None}


def markdown(result: dict[str, Any]) -> str:
    s, m = result["summary"], result["machine"]
    lines = [
        f"# Storage copy vs its floor ({m['date'][:10]})", "",
        f"`python -m scripts.bench.storage --runs {result['args']['runs']}"
        f"{' --mirror' if result['args'].get('mirror') else ''}`: a "
        f"{DISK_GIB} GiB qcow2 with {RANDOM_GIB} GiB of random data, {s['pairs']} "
        "interleaved pairs after a warm-up of each, medians, ms. "
        f"{m['nproc']} CPUs ({m['cpu_model']}), {m['qemu']}, load "
        f"{m['loadavg_start'][0]:.1f} at the start.", "",
        "| what | ferry | floor | ratio |", "| --- | ---: | ---: | ---: |",
        f"| disk copy (ferry: first job started to all mirrors in sync; floor: qemu-img "
        "convert into "
        f"the NBD export) | {s['ferry_disk_copy_ms']:.0f} | {s['floor_convert_ms']:.0f} | "
        f"{s['ratio']} (pairs: {s['median_pair_ratio']}) |",
        f"| MiB/s over the allocated data | {s['ferry_mib_s']} | {s['floor_mib_s']} | |",
        f"| whole migration, RAM and disks together (client wall) | "
        f"{s['ferry_wall_ms']:.0f} | | |",
        f"| Perform's QEMU time (the disks, then the RAM) / downtime | "
        f"{s['ferry_qemu_time_ms']:.0f} / {s['ferry_downtime_ms']:.0f} | | |", "",
        "Every sample:", "", "| # | ferry disk copy | floor convert | ferry wall | direction |",
        "| ---: | ---: | ---: | ---: | --- |"]
    for i, (a, b) in enumerate(zip(result["ferry"], result["floor"], strict=False), 1):
        lines.append(f"| {i} | {a['disk_copy_ms']} | {b['convert_ms']:.0f} | "
                     f"{a['wall_ms']:.0f} | {a['direction']} |")
    return "\n".join(lines) + "\n"


def retry_markdown(result: dict[str, Any]) -> str:
    m, rows = result["machine"], result["retry"]
    ratios = [r["ratio"] for r in rows]
    lines = [
        f"## A retry after a cut at 50 % ({m['date'][:10]})", "",
        f"`python -m scripts.bench.storage --retry --runs {len(rows)}`: the same disk, "
        "sources with FERRY_STORAGE_RESUMABLE=1, each copy aborted once half the disk "
        "went, then retried to the same dest. Median share of a full copy the retry "
        f"sent: {statistics.median(ratios)} (target <= 0.6).", "",
        "| # | cut at (bytes) | retry sent | reused | full copy | ratio | retry wall ms "
        "| guest pause at hand-over ms | direction |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['cut_at']} | {r['retry_processed']} | {r['reused']} | "
                     f"{r['full']} | {r['ratio']} | {r['retry_wall_ms']:.0f} | "
                     f"{r['handover_ms']} | {r['direction']} |")
    return "\n".join(lines) + "\n"


def run_retry(runs: int, root: Path, ports: str, cut_bandwidth_mib: int) -> dict[str, Any]:
    stack = Stack(root=root, log_level="INFO", extra_env={
        "FERRY_MIGRATION_PORTS": ports, "FERRY_STORAGE_RESUMABLE": "1"})
    result: dict[str, Any] = {"machine": machine(), "args": {"runs": runs}}
    try:
        _log(f"state root {root}; building the {DISK_GIB} GiB disk")
        template = make_disk(root)
        client = start_stack(stack)
        ferry = FerrySide(client, root, template)
        ferry.start()
        rows = []
        try:
            for i in range(runs):
                rows.append(ferry.retry_sample(cut_bandwidth_mib))
                _log(f"{i + 1}/{runs}: {rows[-1]}")
        finally:
            ferry.remove()
        result["retry"] = rows
    finally:
        stack.stop(kill_guests=True)
    return result


def run(runs: int, warmup: int, root: Path, ports: str, mirror: bool = False
        ) -> dict[str, Any]:
    stack = Stack(root=root, log_level="INFO", extra_env={
        "FERRY_MIGRATION_PORTS": ports, "FERRY_STORAGE_RESUMABLE": "0" if mirror else "1"})
    result: dict[str, Any] = {"machine": machine(),
                              "args": {"runs": runs, "warmup": warmup, "mirror": mirror}}
    try:
        _log(f"state root {root}; building the {DISK_GIB} GiB disk")
        template = make_disk(root)
        floor_src = root / "floor-source.qcow2"
        shutil.copyfile(template, floor_src)
        client = start_stack(stack)
        ferry, floor = FerrySide(client, root, template), Floor(root, floor_src)
        ferry.start()
        fs: list[dict[str, Any]] = []
        bs: list[dict[str, float]] = []
        try:
            for i in range(warmup + runs):
                a, b = ferry.sample(), floor.sample()
                tag = "warm-up" if i < warmup else f"{i - warmup + 1}/{runs}"
                _log(f"{tag}: ferry copy {a['disk_copy_ms']} ms (wall {a['wall_ms']:.0f}), "
                     f"floor {b['convert_ms']:.0f} ms")
                if i >= warmup:
                    fs.append(a)
                    bs.append(b)
        finally:
            ferry.remove()
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(template)],
                                         check=True, capture_output=True, text=True).stdout)
        result.update(ferry=fs, floor=bs, summary=summarize(fs, bs, info["actual-size"]))
        result["machine"]["loadavg_end"] = list(os.getloadavg())
    finally:
        stack.stop(kill_guests=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.storage", description=__doc__)
    p.add_argument("--runs", type=int, default=5, help="interleaved pairs (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="pairs before, not counted")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep", action="store_true", help="keep the temporary root")
    p.add_argument("--ports", default="39500-39563",
                   help="the hosts' migration port range (below the ephemeral range)")
    p.add_argument("--retry", action="store_true",
                   help="the retry after a cut at 50 %% instead (STORAGE-RETRY.md)")
    p.add_argument("--mirror", action="store_true",
                   help="the mirror-only path (FERRY_STORAGE_RESUMABLE=0: STORAGE-MIRROR.md)")
    p.add_argument("--cut-bandwidth", type=int, default=100,
                   help="MiB/s of the copy that is cut (default 100)")
    args = p.parse_args(argv)
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-bst-", dir="/tmp")))
    try:
        if args.retry:
            result = run_retry(args.runs, root, args.ports, args.cut_bandwidth)
        else:
            result = run(args.runs, args.warmup, root, args.ports, args.mirror)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.retry:
        text = retry_markdown(result)
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S") + "-storage-retry"
        (args.out / f"{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
        (BENCH_DIR / "STORAGE-RETRY.md").write_text(text)
        print(text)
        return 0
    text = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-storage"
    (args.out / f"{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (BENCH_DIR / ("STORAGE-MIRROR.md" if args.mirror else "STORAGE.md")).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
