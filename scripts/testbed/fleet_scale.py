"""Many migrations at once on a fleet: one round, and a watch that no guest runs twice.

Shared by the scale test (tests/e2e/test_fleet_scale.py) and the scale bench
(scripts/bench/scale.py).  A round sends every move at once and notes when
each ends (its result appears in the backend); the `RunWatch` asks every host
in turn which guests run there, all through the round (the `FileWatch` reads
their status files instead, at no cost to the workers), and `double_runs`
says which guest was ever seen running on two hosts.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.states import READY_STATES

from config.settings import Settings
from scripts.testbed.stack import pid_alive
from tasks.client import Client

Move = tuple[str, str, str]  # guest name, source, dest


@dataclass
class Outcome:
    guest: str
    source: str
    dest: str
    seconds: float
    error: str | None = None
    phases: dict[str, float] | None = None  # ms per phase, from the summary


@dataclass
class Round:
    wall_s: float
    outcomes: list[Outcome]
    send_s: float = 0.0  # from the first send to the last (the caller sends one by one)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]


def _ready(client: Client, jobs: list[Any], pending: list[int]) -> set[int]:
    """Which of the pending jobs have their result in the backend: one MGET for all
    (asking each in turn every 20 ms was hundreds of round trips a second at N = 16,
    CPU taken from the workers being measured)."""
    backend = client.app.backend
    keys = [backend.get_key_for_task(jobs[i][2].result.id) for i in pending]
    ready = set()
    for i, raw in zip(pending, backend.client.mget(keys), strict=True):
        if raw is not None and json.loads(raw).get("status") in READY_STATES:
            ready.add(i)
    return ready


def move_all(client: Client, moves: list[Move], timeout: float = 600, **options: Any) -> Round:
    """Every move at once (managed live migrations); each one's time from its send to
    its result, and the round's from the first send to the last result."""
    t0 = time.monotonic()
    jobs = [(m, time.monotonic(), client.migrate(m[0], m[1], m[2], live=True, **options))
            for m in moves]
    ended: dict[int, Outcome] = {}
    deadline = t0 + timeout
    while len(ended) < len(jobs):
        ready = _ready(client, jobs, [i for i in range(len(jobs)) if i not in ended])
        for i, ((name, src, dst), sent, job) in enumerate(jobs):
            if i not in ready:
                continue
            error, phases = None, None
            try:
                summary = job.wait(timeout=10)
                phases = {p["phase"]: p["elapsed_ms"] for p in summary.get("phases", [])}
            except Exception as exc:
                error = str(exc) or type(exc).__name__
            ended[i] = Outcome(name, src, dst, time.monotonic() - sent, error, phases)
        if time.monotonic() > deadline:
            for i, ((name, src, dst), sent, _) in enumerate(jobs):
                ended.setdefault(i, Outcome(name, src, dst, time.monotonic() - sent,
                                            f"did not end within {timeout:.0f}s"))
            break
        time.sleep(0.02)
    return Round(time.monotonic() - t0, [ended[i] for i in range(len(jobs))],
                 jobs[-1][1] - t0 if jobs else 0.0)


@dataclass(frozen=True)
class Sighting:
    sent: float  # the request left before this (monotonic)
    answered: float  # and was answered by this
    host: str
    running: frozenset[str]


class RunWatch(threading.Thread):
    """Asks each host in turn which guests run there, until stopped."""

    def __init__(self, settings: Settings, hosts: list[str], pause_s: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.settings, self.hosts, self.pause_s = settings, hosts, pause_s
        self.sightings: list[Sighting] = []
        self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        client = Client(self.settings)  # its own Celery app: not shared across threads
        while not self.halt.wait(self.pause_s):  # pause_s between passes over the hosts
            for host in self.hosts:
                sent = time.monotonic()
                try:
                    doms = client.call(host, "list", timeout=10)
                except Exception:
                    self.errors += 1
                    continue
                running = frozenset(d["name"] for d in doms if d["state"] == "running")
                self.sightings.append(Sighting(sent, time.monotonic(), host, running))

    def stop(self) -> list[Sighting]:
        self.halt.set()
        self.join(timeout=30)
        return list(self.sightings)


class FileWatch(threading.Thread):
    """Reads every host's status files in turn, until stopped: which guests run where,
    at no cost to the workers (hosts on this machine only; the bench uses it, so the
    watch does not take CPU from the migrations it measures).  A status file names
    the state and the QEMU pid at its start (`<domstatus state= reason= pid=>`)."""

    HEAD = re.compile(rb'<domstatus state="([a-z]+)" reason="[^"]*" pid="([0-9]+)"')

    def __init__(self, run_dirs: dict[str, Path], pause_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.run_dirs, self.pause_s = run_dirs, pause_s
        self.sightings: list[Sighting] = []
        self.halt = threading.Event()

    def running(self, run_dir: Path) -> frozenset[str]:
        names = []
        for path in run_dir.glob("*.xml"):
            try:
                with path.open("rb") as f:
                    head = self.HEAD.match(f.read(200))
            except OSError:
                continue
            if head and head.group(1) == b"running" and pid_alive(int(head.group(2))):
                names.append(path.stem)
        return frozenset(names)

    def run(self) -> None:
        while not self.halt.wait(self.pause_s):
            for host, run_dir in self.run_dirs.items():
                sent = time.monotonic()
                running = self.running(run_dir)
                self.sightings.append(Sighting(sent, time.monotonic(), host, running))

    def stop(self) -> list[Sighting]:
        self.halt.set()
        self.join(timeout=30)
        return list(self.sightings)


def double_runs(sightings: list[Sighting], moves: list[Move]) -> list[str]:
    """Guests of a round seen running where they must not be.

    The sightings of one host are not simultaneous with another's, so a guest
    seen on its source and, a moment later, on its dest is a hand-over, not a
    double run.  What cannot happen in a correct hand-over: the guest seen
    running on its source in a request sent after its dest was seen running it
    (the dest never starts before the source stopped, and a source never runs
    again once the dest did), or seen on a host that is neither.
    """
    found = []
    for name, src, dst in moves:
        on_dest = [s.answered for s in sightings if s.host == dst and name in s.running]
        first_on_dest = min(on_dest) if on_dest else None
        for s in sightings:
            if name not in s.running:
                continue
            if s.host not in (src, dst):
                found.append(f"{name} seen running on {s.host}, neither {src} nor {dst}")
            elif s.host == src and first_on_dest is not None and s.sent > first_on_dest:
                found.append(f"{name} seen running on {src} after {dst} ran it")
    return found
