"""`python -m scripts.bench.signals`: job signal round trips and abort latency.

During a migration that does not converge (a TCG guest rewriting 16 MiB as fast
as it can, bandwidth 1 MiB/s), sends jobinfo and setspeed signals alternately
and times publish -> owner acts -> reply.  Then aborts: each one from publish
to the owner's reply, which it sends once QEMU reports the migration stopped
(`cancelled`, or `failed` when a tunnel's closed end reached QEMU first),
direct and tunnelled (p2p) taking turns on the same guest, in two settings:

- capped: the guest above at 1 MiB/s.  QEMU's migration thread sends its
  share of each 100 ms window and sleeps out the rest (BUFFER_DELAY); a
  cancel does not wake it (QEMU 7.2 posts its rate-limit semaphore only for
  post-copy page requests), so QEMU alone takes 0-100 ms to stop;
- uncapped: a guest rewriting 96 MiB, no bandwidth limit, max downtime 1 ms:
  a migration that never converges without QEMU sleeping; what is left is
  ferry's share and QEMU's cancel itself.

Medians and p99; not a pass/fail test.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from config.settings import load
from scripts.bench.report import machine
from scripts.testbed.guestimage import build_image
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import Stack, searchable, wait_for
from tasks.client import Client
from tasks.migrate_client import MigrationJob
from workers.errors import FerryError
from workers.jobsignals import sender

OUT = Path(__file__).resolve().parent / "SIGNALS.md"
ROUTES: dict[str, dict[str, Any]] = {"direct": {}, "tunnelled": {"p2p": True, "tunnelled": True}}
SETTINGS: dict[str, tuple[int, dict[str, Any]]] = {
    # name: (MiB the guest rewrites, migration options)
    "capped": (16, {"bandwidth_mib_s": 1}),
    "uncapped": (96, {"bandwidth_mib_s": 0, "max_downtime_ms": 1}),
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Converged(Exception):
    """The migration completed before the abort was sent (or when it came)."""


def _copying(client: Client, name: str, options: dict[str, Any]) -> MigrationJob:
    job = client.migrate(name, "alpha", "beta", live=True, **options)

    def copying() -> bool:
        if job.done():
            raise Converged
        info = job.info()
        return (info.get("data_processed") or 0) > 0 and info.get("phase") == "perform3"

    wait_for(copying, 60, "the copy to run")
    return job


def _back_to_alpha(client: Client, name: str) -> None:
    """After a migration that completed: the guest comes back for the next abort."""
    with contextlib.suppress(FerryError):
        if client.call("beta", "dominfo", domain=name)["state"] == "running":
            client.migrate(name, "beta", "alpha", live=True).wait(timeout=120)


def _guest(client: Client, root: Path, name: str, dirty_mib: int) -> str:
    image = build_image(root / f"{name}.img", dirty_mib=dirty_mib, rate_mib_s=None)
    xml = guest_xml(name, image, root / f"{name}.serial", memory_mib=128, domain_type="qemu")
    client.call("alpha", "define", xml=xml)
    client.call("alpha", "start", domain=name)
    return client.uuid_of("alpha", name)


def round_trips(client: Client, uuid: str, count: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"jobinfo": [], "setspeed": []}
    for i in range(count):
        for op, sargs in (("jobinfo", {}), ("setspeed", {"bandwidth": 1 + i % 2})):
            t0 = time.perf_counter()
            sender.send_signal(client.redis, uuid, op, sargs)
            results[op].append((time.perf_counter() - t0) * 1000)
    return results


def aborts(client: Client, name: str, uuid: str, options: dict[str, Any], count: int
           ) -> tuple[dict[str, list[float]], dict[str, dict[str, int]]]:
    """`count` aborts per route, the routes taking turns; ms each, and QEMU's words (or
    that the migration converged first: not counted, the guest brought back)."""
    times: dict[str, list[float]] = {route: [] for route in ROUTES}
    said: dict[str, dict[str, int]] = {route: {} for route in ROUTES}
    while min(len(v) for v in times.values()) < count:
        route = min(ROUTES, key=lambda r: len(times[r]))  # the routes take turns
        job = None
        try:
            job = _copying(client, name, {**options, **ROUTES[route]})
            t0 = time.perf_counter()
            reply = sender.send_signal(client.redis, uuid, "abort")
            elapsed = (time.perf_counter() - t0) * 1000
        except (Converged, FerryError) as exc:
            if not isinstance(exc, Converged | sender.NoJobOwnerError) \
                    and "too late to abort" not in str(exc):
                raise
            said[route]["converged first"] = said[route].get("converged first", 0) + 1
            with contextlib.suppress(Exception):
                if job is not None:
                    job.wait(timeout=60)
            _back_to_alpha(client, name)
            continue
        times[route].append(elapsed)
        status = str(reply.get("status"))
        assert status in ("cancelled", "failed"), reply
        said[route][status] = said[route].get(status, 0) + 1
        with contextlib.suppress(Exception):  # it fails: it was aborted
            job.wait(timeout=60)
    return times, said


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    stack = Stack(root=root, log_level=args.log_level)
    try:
        stack.start_redis()
        for host in ("alpha", "beta"):
            stack.start_worker(host)
        client = Client(load({"FERRY_BROKER_URL": stack.broker_url}))
        out: dict[str, Any] = {"load": os.getloadavg()[0], "aborts": {}, "said": {}}
        for setting, (dirty, options) in SETTINGS.items():
            name = f"sig-{setting}"
            uuid = _guest(client, root, name, dirty)
            if setting == "capped" and args.signals:
                job = _copying(client, name, options)
                out["round_trips"] = round_trips(client, uuid, args.signals)
                job.abort()
                with contextlib.suppress(Exception):
                    job.wait(timeout=60)
            times, said = aborts(client, name, uuid, options, args.aborts)
            for route in ROUTES:
                out["aborts"][f"{route}, {setting}"] = times[route]
                out["said"][f"{route}, {setting}"] = said[route]
            client.call("alpha", "destroy", domain=name)
        return out
    finally:
        stack.stop(kill_guests=True)


def markdown(results: dict[str, Any]) -> str:
    m = machine()
    lines = ["## Job signals", "",
             f"`python -m scripts.bench.signals` on {time.strftime('%Y-%m-%d %H:%M')}: "
             f"{m.get('nproc')} CPUs ({m.get('cpu_model')}), {m.get('qemu')}; load average "
             f"{results['load']:.1f} at the start (the machine is shared).", "",
             "| signal | n | median ms | p99 ms | max ms |", "| --- | ---: | ---: | ---: | ---: |"]
    for op, values in results.get("round_trips", {}).items():
        lines.append(f"| {op} | {len(values)} | {statistics.median(values):.2f} | "
                     f"{pct(values, 0.99):.2f} | {max(values):.2f} |")
    for case, values in results["aborts"].items():
        said = ", ".join(f"{k} {v}" for k, v in sorted(results["said"][case].items()))
        lines.append(f"| abort ({case}; QEMU said: {said}) | {len(values)} | "
                     f"{statistics.median(values):.2f} | {pct(values, 0.99):.2f} | "
                     f"{max(values):.2f} |")
    lines += ["", "abort: from publishing the signal to the job owner's reply, which it sends "
              "once QEMU reports the migration stopped. capped: 1 MiB/s, where QEMU's "
              "migration thread sleeps up to 100 ms between its sends and a cancel does not "
              "wake it; uncapped: a guest rewriting 96 MiB, no limit, max downtime 1 ms."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.signals", description=__doc__)
    p.add_argument("--signals", type=int, default=200, help="jobinfo and setspeed each")
    p.add_argument("--aborts", type=int, default=200, help="per route (direct, tunnelled) "
                                                           "and setting (capped, uncapped)")
    p.add_argument("--log-level", default="INFO",
                   help="FERRY_LOG_LEVEL of the workers (DEBUG logs every QMP command)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary root (worker logs, QEMU logs) afterwards")
    args = p.parse_args(argv)
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-bsig-", dir="/tmp")))
    try:
        results = run(args, root)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = markdown(results)
    OUT.write_text(text)
    print(text)
    print(json.dumps({k: sorted(v) for k, v in results["aborts"].items()})[:400])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
