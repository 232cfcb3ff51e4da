"""Many migrations at once on a fleet: one round, and a watch that no guest runs twice.

Shared by the scale test (tests/e2e/test_fleet_scale.py) and the scale bench
(scripts/bench/scale.py).  A round sends every move at once and notes when
each ends (its result appears in the backend); the `RunWatch` asks every host
in turn which guests run there, all through the round, and `double_runs`
says which guest was ever seen running on two hosts.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from config.settings import Settings
from tasks.client import Client

Move = tuple[str, str, str]  # guest name, source, dest


@dataclass
class Outcome:
    guest: str
    source: str
    dest: str
    seconds: float
    error: str | None = None


@dataclass
class Round:
    wall_s: float
    outcomes: list[Outcome]

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]


def move_all(client: Client, moves: list[Move], timeout: float = 600, **options: Any) -> Round:
    """Every move at once (managed live migrations); each one's time from its send to
    its result, and the round's from the first send to the last result."""
    t0 = time.monotonic()
    jobs = [(m, time.monotonic(), client.migrate(m[0], m[1], m[2], live=True, **options))
            for m in moves]
    ended: dict[int, Outcome] = {}
    deadline = t0 + timeout
    while len(ended) < len(jobs):
        for i, ((name, src, dst), sent, job) in enumerate(jobs):
            if i in ended or not job.result.ready():
                continue
            error = None
            try:
                job.wait(timeout=10)
            except Exception as exc:
                error = str(exc) or type(exc).__name__
            ended[i] = Outcome(name, src, dst, time.monotonic() - sent, error)
        if time.monotonic() > deadline:
            for i, ((name, src, dst), sent, _) in enumerate(jobs):
                ended.setdefault(i, Outcome(name, src, dst, time.monotonic() - sent,
                                            f"did not end within {timeout:.0f}s"))
            break
        time.sleep(0.02)
    return Round(time.monotonic() - t0, [ended[i] for i in range(len(jobs))])


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
