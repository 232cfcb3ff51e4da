"""Admission for a fleet: at most FERRY_MAX_PAIR_MIGRATIONS between one source and one
dest at once; the others wait in order, shown queued in domjobinfo."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.testbed.stack import wait_for
from tests.conftest import FleetRun, fleet_of
from workers.errors import FerryError

PAIR_LIMIT = 2
# Only the pair limit binds (outgoing and incoming are larger); each migration from p1
# holds its slot at least 3 s (the failpoint waits before QEMU's migrate).
ENV = {"FERRY_MAX_PAIR_MIGRATIONS": str(PAIR_LIMIT), "FERRY_MAX_OUTGOING_MIGRATIONS": "8",
       "FERRY_MAX_INCOMING_MIGRATIONS": "8"}
SLOW = {"FERRY_FAILPOINTS": "perform3.before_migrate=slow"}


@pytest.fixture(scope="module")
def fleet(base_image: Path) -> Iterator[FleetRun]:
    with fleet_of(["p1", "p2", "p3"], base_image, env=ENV, host_env={"p1": SLOW}) as run:
        yield run


@pytest.fixture(autouse=True)
def guests_removed(fleet: FleetRun) -> Iterator[None]:
    yield
    fleet.remove_guests()


class InFlight(threading.Thread):
    """Samples which guests have a QEMU on both p1 and p2 (between Prepare and Confirm)."""

    def __init__(self, fleet: FleetRun, uuids: list[str]) -> None:
        super().__init__(daemon=True)
        self.fleet, self.uuids = fleet, uuids
        self.samples: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        ns = {self.fleet.fleet.netns_inode(h): h for h in ("p1", "p2")}
        while not self.halt.is_set():
            where = _qemu_namespaces(self.uuids, ns)
            self.samples.append(sum(1 for u in self.uuids if where.get(u) == {"p1", "p2"}))
            time.sleep(0.05)


def _qemu_namespaces(uuids: list[str], ns: dict[int, str]) -> dict[str, set[str]]:
    """For each guest uuid, the hosts (by network namespace) where a QEMU of it runs."""
    out: dict[str, set[str]] = {}
    wanted = {u.encode(): u for u in uuids}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            host = ns.get((entry / "ns" / "net").stat().st_ino)
        except OSError:
            continue
        for arg in args:
            if arg in wanted and host is not None:
                out.setdefault(wanted[arg], set()).add(host)
    return out


def test_migrations_beyond_the_pair_limit_wait_in_order_shown_queued_and_all_complete(
        fleet: FleetRun) -> None:
    c = fleet.client
    guests = [fleet.boot("p1", fleet.guest()) for _ in range(5)]
    other = fleet.boot("p1", fleet.guest())
    sampler = InFlight(fleet, [g.uuid for g in guests])
    sampler.start()
    seen: list[dict[str, object]] = []
    try:
        jobs = []
        for g in guests:  # one after the other, each in line before the next is sent
            jobs.append(c.migrate(g.name, "p1", "p2", live=True))
            wait_for(lambda g=g: c.call("p1", "domjobinfo", domain=g.name)["type"] != "none",
                     20, f"{g.name}'s job to exist or be queued")
        last = guests[-1].name

        def last_queued() -> dict[str, object] | None:
            info = c.call("p1", "domjobinfo", domain=last)
            seen.append(info)
            return info if info["phase"] == "queued" else None

        info = wait_for(last_queued, 10, "the last migration to show queued")
        assert isinstance(info, dict)
        assert (info["type"], info["operation"], info["queue"]) == \
            ("unbounded", "outgoing_migration", "pair")
        assert info["queue_position"] in (1, 2, 3)  # 3 unless job 1 already ended
        cli = _cli_jobinfo(fleet, last)
        assert cli["phase"] == "queued" and cli["queue"] == "pair"
        # Another pair from the same source is not held up by this line.
        beside_job = c.migrate(other.name, "p1", "p3", live=True)
        while True:  # the place shrinks as the ones in front finish
            info = c.call("p1", "domjobinfo", domain=last)
            seen.append(info)
            if info["phase"] != "queued":
                break
            time.sleep(0.1)
        summaries = [j.wait(timeout=120) for j in jobs]
        beside = beside_job.wait(timeout=60)
    finally:
        sampler.halt.set()
        sampler.join(timeout=10)

    assert [s["result"] for s in summaries] == ["completed"] * 5, \
        [s["error"] for s in summaries]
    assert max(sampler.samples) == PAIR_LIMIT, "the limit was reached, never passed"
    places = [i["queue_position"] for i in seen if i["phase"] == "queued"]
    assert places == sorted(places, reverse=True) and places[-1] == 1
    assert len(set(places)) >= 2, "it moved up the line"
    starts = [s["statistics"]["started"] for s in summaries]
    assert beside["result"] == "completed", beside["error"]
    assert beside["statistics"]["started"] < starts[4], "p1 -> p3 did not wait for p1 -> p2"
    first_end = min(s["statistics"]["stopped"] for s in summaries[:2])
    assert starts[2] >= first_end, "the third waited for one of the first two"
    # In arrival order: when a waiting one started, fewer than PAIR_LIMIT of those sent
    # before it were still running (two admitted at once may start in either order).
    stops = [s["statistics"]["stopped"] for s in summaries]
    for k in range(PAIR_LIMIT, len(summaries)):
        ahead_running = sum(1 for j in range(k) if stops[j] > starts[k])
        assert ahead_running < PAIR_LIMIT, f"migration {k + 1} went before its turn"
    for g in guests:
        assert fleet.running_on(g) == ["p2"]


def _cli_jobinfo(fleet: FleetRun, domain: str) -> dict[str, object]:
    exe = str(Path(sys.executable).with_name("ferry"))
    assert fleet.fleet.stack is not None
    proc = subprocess.run([exe, "domjobinfo", "-H", "p1", domain, "--json"],
                          env=fleet.fleet.stack.env(), capture_output=True, text=True,
                          timeout=30, check=True)
    return dict(json.loads(proc.stdout))


def test_aborting_a_migration_that_waits_in_line_takes_it_out_and_the_guest_stays(
        fleet: FleetRun) -> None:
    c = fleet.client
    ahead = [fleet.boot("p1", fleet.guest()) for _ in range(PAIR_LIMIT)]
    waiting = fleet.boot("p1", fleet.guest())
    jobs = [c.migrate(g.name, "p1", "p2", live=True) for g in ahead]
    for g in ahead:
        wait_for(lambda g=g: c.call("p1", "domjobinfo", domain=g.name)["type"] != "none",
                 20, f"{g.name}'s job to start")
    job = c.migrate(waiting.name, "p1", "p2", live=True)
    wait_for(lambda: c.call("p1", "domjobinfo", domain=waiting.name)["phase"] == "queued",
             10, "the third migration to wait in line")

    reply = c.signal("p1", waiting.name, "abort")

    assert reply["aborted"] is True
    with pytest.raises(FerryError, match="canceled by client while it waited in line"):
        job.wait(timeout=30)
    assert c.call("p1", "domjobinfo", domain=waiting.name)["type"] == "none"
    lines = [k for k in c.redis.scan_iter("ferry:slots:*")
             if any(job.id.encode() in e for e in c.redis.lrange(k, 0, -1))]
    assert lines == [], "the aborted job left its place in line"
    assert [j.wait(timeout=120)["result"] for j in jobs] == ["completed"] * PAIR_LIMIT
    assert fleet.running_on(waiting) == ["p1"]
    assert _qemu_namespaces([waiting.uuid], {fleet.fleet.netns_inode("p2"): "p2"}) == {}, \
        "no QEMU was started for it on the dest"
    before = waiting.wait_tick()
    assert waiting.wait_kept_running().count > before.count, \
        "it still runs on the source"
