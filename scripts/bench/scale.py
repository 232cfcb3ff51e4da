"""`python -m scripts.bench --case scale`: many migrations at once on 4 namespace hosts.

A fleet (scripts/testbed/fleet.py) of 4 hosts, each a network namespace with its own
address and `ferry worker`, one redis-server on a bridge.  For each count N
(default 1, 2, 4, 8, 16): N small TCG guests spread over the hosts (guest i
on host i mod 4), every one moved at once to the next host, then all back;
and the floor: N twins in bare QEMU in the same namespaces, the same moves
at the same concurrency driven over QMP (scripts/bench/floor.py), no ferry.
Ferry and floor alternate (A B A B ...), each run being one move there and
one back.  The admission limits are raised to N so that all N move at once,
as the floor's do.

Per run and direction: total time (first send to last result), each
migration's time (its send to its result), failures, and a watch that no
guest ran on two hosts (scripts/testbed/fleet_scale.py); per N: CPU seconds of the
workers and of Redis over the ferry runs, and their peak RSS (VmHWM).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from config.settings import load
from scripts.bench.cpu import CpuSampler
from scripts.bench.floor import FloorGuest
from scripts.testbed.fleet import Fleet
from scripts.testbed.fleet_scale import FileWatch, Move, double_runs, move_all
from scripts.testbed.guestimage import build_image, serial_counters
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import wait_for
from tasks.client import Client

CASE = "scale"
HOSTS = ["h1", "h2", "h3", "h4"]
COUNTS = (1, 2, 4, 8, 16)
MEMORY_MIB = 32
PHASES = ("begin3", "prepare", "perform3", "finish3", "confirm3")
WATCH_PAUSE_S = 0.02  # the no-double-run watch reads status files: no worker CPU


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def _rss_kib(pid: int) -> dict[str, int]:
    """Current and peak resident memory of a process, KiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _counting(serial: Path) -> Callable[[], bool]:
    def counting() -> bool:
        try:
            return bool(serial_counters(serial.read_text(errors="replace")))
        except OSError:
            return False
    return counting


def _placement(n: int) -> list[tuple[str, str]]:
    """(home, next host) of guest i: i mod 4, then the host after it."""
    return [(HOSTS[i % 4], HOSTS[(i + 1) % 4]) for i in range(n)]


class ScaleRun:
    def __init__(self, fleet: Fleet, client: Client, root: Path, image: Path) -> None:
        self.fleet, self.client, self.root, self.image = fleet, client, root, image

    def _xml(self, name: str, work: Path) -> str:
        disk = work / f"{name}.img"
        shutil.copyfile(self.image, disk)
        return guest_xml(name, disk, work / f"{name}.serial", memory_mib=MEMORY_MIB,
                         domain_type="qemu")

    def ferry_guests(self, n: int, work: Path) -> list[Move]:
        moves = []
        for i, (home, nxt) in enumerate(_placement(n)):
            name = f"f{n}-{i}"
            self.client.call(home, "define", xml=self._xml(name, work))
            self.client.call(home, "start", domain=name)
            moves.append((name, home, nxt))
        return moves

    def floor_guests(self, n: int, work: Path) -> list[FloorGuest]:
        floors = []
        for i, (home, nxt) in enumerate(_placement(n)):
            a, b = self.fleet.hosts[home], self.fleet.hosts[nxt]
            fdir = work / f"floor-{i}"
            fdir.mkdir()
            floor = FloorGuest(self._xml(f"b{n}-{i}", work), fdir,
                               places=((a.netns, a.address), (b.netns, b.address)))
            floors.append(floor)
            floor.start()
        return floors

    def ferry_run(self, moves: list[Move]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        back = [(name, dst, src) for name, src, dst in moves]
        for label, ms in (("there", moves), ("back", back)):
            watch = FileWatch({h: self.fleet.root / h / "run" for h in HOSTS},
                              pause_s=WATCH_PAUSE_S)
            watch.start()
            try:
                rnd = move_all(self.client, ms, timeout=600)
            finally:
                sightings = watch.stop()
            out[label] = {"total_ms": round(rnd.wall_s * 1000, 1),
                          "send_ms": round(rnd.send_s * 1000, 1),
                          "each_ms": [round(o.seconds * 1000, 1) for o in rnd.outcomes],
                          "phases_ms": [o.phases for o in rnd.outcomes],
                          "failures": [o.error for o in rnd.failures],
                          "double_runs": double_runs(sightings, ms),
                          "watch_samples": len(sightings)}
        return out

    def floor_run(self, floors: list[FloorGuest]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with ThreadPoolExecutor(max_workers=len(floors)) as pool:
            for label in ("there", "back"):
                t0 = time.monotonic()
                futures = [pool.submit(f.migrate) for f in floors]
                each, failures = [], []
                for fut in futures:
                    try:
                        # to the source's exit, as ferry's result comes after Confirm
                        each.append(round(fut.result(timeout=600).quit_ms, 1))
                    except Exception as exc:
                        failures.append(str(exc))
                out[label] = {"total_ms": round((time.monotonic() - t0) * 1000, 1),
                              "each_ms": each, "failures": failures}
        return out


def _destroy(client: Client, moves: list[Move]) -> None:
    for name, src, dst in moves:
        for host in (src, dst):
            for task in ("destroy", "undefine"):
                try:
                    client.call(host, task, domain=name, timeout=30)
                except Exception:
                    continue


def run_count(run: ScaleRun, n: int, runs: int, pids: dict[int, str]) -> dict[str, Any]:
    work = run.root / f"n{n}"
    work.mkdir()
    moves = run.ferry_guests(n, work)
    floors: list[FloorGuest] = []
    ferry_runs, floor_runs = [], []
    cpu: dict[str, float] = {}
    try:
        floors = run.floor_guests(n, work)
        for serial in work.glob("*.serial"):  # every guest booted: its counter runs
            wait_for(_counting(serial), 120, f"{serial.stem} to boot")
        for r in range(runs):
            with CpuSampler(pids, "none", str(run.root)) as sampler:
                ferry_runs.append(run.ferry_run(moves))
            for key, value in sampler.result().items():
                if key in pids.values():
                    cpu[key] = cpu.get(key, 0.0) + value
            floor_runs.append(run.floor_run(floors))
            f, b = ferry_runs[-1], floor_runs[-1]
            _log(f"[N={n}] run {r + 1}/{runs}: ferry there/back "
                 f"{f['there']['total_ms']:.0f}/{f['back']['total_ms']:.0f} ms, floor "
                 f"{b['there']['total_ms']:.0f}/{b['back']['total_ms']:.0f} ms, failures "
                 f"{len(f['there']['failures']) + len(f['back']['failures'])}")
    finally:
        for floor in floors:
            floor.close()
        _destroy(run.client, moves)
    return summarize(n, ferry_runs, floor_runs, cpu, pids)


def _phase_medians(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per-phase medians over every ferry migration of one N (ms)."""
    seen: dict[str, list[float]] = {}
    for r in runs:
        for d in ("there", "back"):
            for phases in r[d].get("phases_ms", []):
                for name, ms in (phases or {}).items():
                    seen.setdefault(name, []).append(ms)
    return {name: _median(values) for name, values in seen.items()}


def summarize(n: int, ferry_runs: list[dict[str, Any]], floor_runs: list[dict[str, Any]],
              cpu: dict[str, float], pids: dict[int, str]) -> dict[str, Any]:
    def figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
        rounds = [r[d] for r in runs for d in ("there", "back")]
        each = [ms for rd in rounds for ms in rd["each_ms"]]
        return {"total_ms": _median([rd["total_ms"] for rd in rounds]),
                "each_median_ms": _median(each), "each_max_ms": max(each) if each else None,
                "send_ms": _median([rd["send_ms"] for rd in rounds if "send_ms" in rd]),
                "failures": sum(len(rd["failures"]) for rd in rounds),
                "migrations": sum(len(rd["each_ms"]) + len(rd["failures"]) for rd in rounds)}

    ferry, floor = figures(ferry_runs), figures(floor_runs)
    ratio = (round(ferry["total_ms"] / floor["total_ms"], 2)
             if ferry["total_ms"] and floor["total_ms"] else None)
    doubles = [d for r in ferry_runs for x in ("there", "back") for d in r[x]["double_runs"]]
    workers = [p for p, label in pids.items() if label.startswith("worker")]
    redis_pid = next(p for p, label in pids.items() if label == "redis")
    return {
        "guests": n, "ferry": ferry, "floor": floor, "total_ratio": ratio,
        "ferry_phase_ms": _phase_medians(ferry_runs),
        "each_ratio": (round(ferry["each_median_ms"] / floor["each_median_ms"], 2)
                       if ferry["each_median_ms"] and floor["each_median_ms"] else None),
        "double_runs": doubles,
        "cpu_s": {"workers": round(sum(v for k, v in cpu.items() if k.startswith("worker")),
                                   2),
                  "redis": round(cpu.get("redis", 0.0), 2)},
        "peak_rss_mib": {"workers max": round(max(_rss_kib(p).get("VmHWM", 0)
                                                  for p in workers) / 1024, 1),
                         "redis": round(_rss_kib(redis_pid).get("VmHWM", 0) / 1024, 1)},
        "runs": {"ferry": ferry_runs, "floor": floor_runs},
    }


def run_scale(root: Path, counts: list[int], runs: int, log_level: str) -> dict[str, Any]:
    """Start the fleet, measure every count, stop everything (by pid), also on failure."""
    limit = str(max(counts))
    fleet = Fleet(root=root / "fleet", log_level=log_level, extra_env={
        "FERRY_MAX_OUTGOING_MIGRATIONS": limit, "FERRY_MAX_INCOMING_MIGRATIONS": limit,
        "FERRY_MAX_PAIR_MIGRATIONS": limit, "FERRY_WORKER_CONCURRENCY": "16"})
    cases = []
    try:
        fleet.root.mkdir(parents=True)
        fleet.start(HOSTS)
        client = Client(load({"FERRY_BROKER_URL": fleet.broker_url}))
        image = build_image(root / "guest.img", dirty_mib=1, rate_mib_s=1)
        run = ScaleRun(fleet, client, root, image)
        assert fleet.stack is not None and fleet.stack.redis_proc is not None
        pids = {fleet.stack.redis_proc.pid: "redis"}
        for name, w in fleet.stack.workers.items():
            if w.proc is not None:
                pids[w.proc.pid] = f"worker {name}"
        for n in counts:
            _log(f"[N={n}] {n} guest(s) of {MEMORY_MIB} MiB on {len(HOSTS)} hosts")
            cases.append(run_count(run, n, runs, pids))
    finally:
        fleet.stop()
    return {"case": CASE, "hosts": len(HOSTS), "memory_mib": MEMORY_MIB, "limits": limit,
            "counts": cases}


def markdown(result: dict[str, Any]) -> str:
    m, opts, c = result["machine"], result["args"], result["cases"][0]
    out = [
        "## scale",
        "",
        f"`python -m scripts.bench --case scale --runs {opts['runs']} --counts "
        f"{','.join(str(x['guests']) for x in c['counts'])}` on {m['date']}: {m['nproc']} "
        f"CPUs ({m['cpu_model']}), kernel {m['kernel']}, {m['qemu']}; load average at start "
        f"{m['loadavg_start'][0]:.2f}.",
        "",
        f"{c['hosts']} namespace hosts (scripts/testbed/fleet.py), N TCG guests of "
        f"{c['memory_mib']} MiB (guest i on host i mod 4), all moved at once to the next host, "
        "then all back; "
        "the floor moves N twins in bare QEMU in the same namespaces at the same "
        "concurrency over QMP. Ferry and floor alternate (A B A B), each run one move "
        f"there and one back; admission limits raised to {c['limits']}. Medians over both "
        "directions of every run; per-migration time from its send to its result (ferry: "
        "after Confirm removed the source) or from starting the incoming QEMU to the source "
        "QEMU's exit (floor). CPU: seconds over all ferry runs "
        "of one N; RSS: peak (VmHWM) after them. During ferry runs a watch reads every "
        f"host's status files (every {WATCH_PAUSE_S} s: which guests run, by state and live "
        "QEMU pid) and checks no guest ran on two hosts; the caller learns of all results "
        "with one MGET every 20 ms.",
        "",
        "| N | ferry total ms | floor total ms | ratio | ferry each median / max ms "
        "| floor each median / max ms | ratio | failures ferry / floor | guests seen twice "
        "| workers CPU s | redis CPU s | worker peak RSS MiB | redis peak RSS MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for x in c["counts"]:
        fe, fl = x["ferry"], x["floor"]
        out.append(
            f"| {x['guests']} | {fe['total_ms']} | {fl['total_ms']} | {x['total_ratio']} "
            f"| {fe['each_median_ms']} / {fe['each_max_ms']} | {fl['each_median_ms']} / "
            f"{fl['each_max_ms']} | {x['each_ratio']} | {fe['failures']}/{fe['migrations']} / "
            f"{fl['failures']}/{fl['migrations']} | {len(x['double_runs'])} "
            f"| {x['cpu_s']['workers']} | {x['cpu_s']['redis']} "
            f"| {x['peak_rss_mib']['workers max']} | {x['peak_rss_mib']['redis']} |")
    out += ["", "ferry's per-phase medians (ms) at each N, and how long the caller took to "
            "send all N migrations (one `Client.migrate` after the other):", "",
            "| N | sending all N | " + " | ".join(PHASES) + " |",
            "| ---: | ---: |" + " ---: |" * len(PHASES)]
    for x in c["counts"]:
        ph = x.get("ferry_phase_ms") or {}
        send = x["ferry"].get("send_ms")
        out.append(f"| {x['guests']} | {'n/a' if send is None else f'{send:.0f}'} | " + " | ".join(
            "n/a" if ph.get(p) is None else f"{ph[p]:.0f}" for p in PHASES) + " |")
    return "\n".join(out) + "\n"
