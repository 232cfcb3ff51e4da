"""`python -m scripts.bench.signals`: job signal round trips and abort latency.

During a migration that does not converge (a TCG guest rewriting 16 MiB as fast
as it can, bandwidth 1 MiB/s), sends jobinfo and setspeed signals alternately
and times publish -> owner acts -> reply; then runs `--aborts` migrations and
times each abort from publish to the owner's reply, which it sends once QEMU
reports the migration `cancelled`.  Medians and p99; not a pass/fail test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from config.settings import load
from scripts.bench.report import machine
from scripts.testbed.guestimage import build_image
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import Stack, searchable, wait_for
from tasks.client import Client
from workers.jobsignals import sender

OUT = Path(__file__).resolve().parent / "SIGNALS.md"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _copying(client: Client, name: str, src: str, dst: str) -> object:
    job = client.migrate(name, src, dst, live=True, bandwidth_mib_s=1)
    wait_for(lambda: job.info()["phase"] == "perform3"
             and (job.info()["data_processed"] or 0) > 0, 60, "the copy to run")
    return job


def run(args: argparse.Namespace, root: Path) -> dict[str, list[float]]:
    stack = Stack(root=root)
    try:
        stack.start_redis()
        for host in ("alpha", "beta"):
            stack.start_worker(host)
        client = Client(load({"FERRY_BROKER_URL": stack.broker_url}))
        image = build_image(root / "busy.img", dirty_mib=16, rate_mib_s=None)
        xml = guest_xml("sig", image, root / "sig.serial", memory_mib=128, domain_type="qemu")
        client.call("alpha", "define", xml=xml)
        client.call("alpha", "start", domain="sig")
        uuid = client.uuid_of("alpha", "sig")
        results: dict[str, list[float]] = {"jobinfo": [], "setspeed": [], "abort": []}
        job = _copying(client, "sig", "alpha", "beta")
        for i in range(args.signals):
            for op, sargs in (("jobinfo", {}), ("setspeed", {"bandwidth": 1 + i % 2})):
                t0 = time.perf_counter()
                sender.send_signal(client.redis, uuid, op, sargs)
                results[op].append((time.perf_counter() - t0) * 1000)
        for _ in range(args.aborts):
            t0 = time.perf_counter()
            reply = sender.send_signal(client.redis, uuid, "abort")
            results["abort"].append((time.perf_counter() - t0) * 1000)
            assert reply["status"] == "cancelled", reply
            with contextlib.suppress(Exception):  # it fails: it was aborted
                job.wait(timeout=30)  # type: ignore[attr-defined]
            job = _copying(client, "sig", "alpha", "beta")
        job.abort()  # type: ignore[attr-defined]
        return results
    finally:
        stack.stop(kill_guests=True)


def markdown(results: dict[str, list[float]]) -> str:
    m = machine()
    lines = ["## Job signals", "",
             f"`python -m scripts.bench.signals` on {time.strftime('%Y-%m-%d')}: "
             f"{m.get('nproc')} CPUs ({m.get('cpu_model')}), {m.get('qemu')}.", "",
             "| signal | n | median ms | p99 ms | max ms |", "| --- | ---: | ---: | ---: | ---: |"]
    for op, values in results.items():
        if values:
            lines.append(f"| {op} | {len(values)} | {statistics.median(values):.2f} | "
                         f"{pct(values, 0.99):.2f} | {max(values):.2f} |")
    lines += ["", "abort: from publishing the signal to the job owner's reply, which it sends "
              "once QEMU reports the migration `cancelled` (the tunnel, if any, closed first)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.signals", description=__doc__)
    p.add_argument("--signals", type=int, default=200, help="jobinfo and setspeed each")
    p.add_argument("--aborts", type=int, default=200)
    args = p.parse_args(argv)
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-bsig-", dir="/tmp")))
    try:
        results = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = markdown(results)
    OUT.write_text(text)
    print(text)
    print(json.dumps({k: sorted(v) for k, v in results.items()})[:200])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
