"""Network cuts between namespace hosts (scripts/testbed/fleet.py).

A cut is the dest's veth brought down inside its namespace: its peer loses
carrier and the bridge drops what is sent to it (no filter, no RST: the
source's TCP just retransmits).  Each host has two links, so the migration
path can be cut while the broker stays reachable, or both.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.testbed.stack import wait_for
from tests.conftest import FleetRun, Guest, fleet_of, qemu_pids_of
from workers.errors import FerryError

STALL_S = 3
ENV = {"FERRY_MIGRATION_STALL_TIMEOUT_S": str(STALL_S), "FERRY_P2P_TIMEOUT_S": "5",
       "FERRY_SWEEP_INTERVAL_S": "1"}
BANDWIDTH = 2  # MiB/s: below the test guest's dirty rate, so Perform runs until cut


@pytest.fixture(scope="module")
def fleet(base_image: Path) -> Iterator[FleetRun]:
    with fleet_of(["c1", "c2"], base_image, env=ENV) as run:
        yield run


@pytest.fixture(autouse=True)
def links_back_up(fleet: FleetRun) -> Iterator[None]:
    yield
    fleet.fleet.set_link("c2", data=True, broker=True)

    def alive() -> bool:
        # Both paths back: the heartbeat record (clients refuse a host without one)
        # and the queue; the first can lag the second by a beat after a cut.
        try:
            fleet.client.host("c2")
            fleet.client.call("c2", "list", timeout=5)
        except FerryError:
            return False
        return True

    wait_for(alive, 60, "c2 to be back (heartbeat and queue)")
    fleet.remove_guests()


def _qemus_in(fleet: FleetRun, host: str, g: Guest) -> list[int]:
    ns = fleet.fleet.netns_inode(host)
    return [p for p in qemu_pids_of(g.uuid) if _netns_of(p) == ns]


def _netns_of(pid: int) -> int | None:
    """The inode of the network namespace of `pid`; None once it has exited."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except FileNotFoundError:
        return None


def _streaming(fleet: FleetRun, g: Guest) -> None:
    """Until Perform runs and some data reached the dest."""
    def sent() -> bool:
        info = fleet.client.call("c1", "domjobinfo", domain=g.name)
        return info["phase"] == "perform3" and (info["data_processed"] or 0) > (1 << 20)

    wait_for(sent, 30, "the migration stream to flow")


def _query_migrate(fleet: FleetRun, host: str, g: Guest) -> str:
    reply = fleet.client.call(host, "qemu_monitor_command", domain=g.name,
                              command=json.dumps({"execute": "query-migrate"}))
    return str((reply.get("return", reply) if isinstance(reply, dict) else {}).get("status"))


def test_cutting_the_migration_path_during_perform_cancels_it_in_bounded_time_and_the_source_runs_on(  # noqa: E501
        fleet: FleetRun) -> None:
    g = fleet.boot("c1", fleet.guest())
    job = fleet.client.migrate(g.name, "c1", "c2", live=True, bandwidth_mib_s=BANDWIDTH)
    _streaming(fleet, g)
    assert _qemus_in(fleet, "c2", g), "the incoming QEMU runs in c2"
    cut_at = time.monotonic()
    fleet.fleet.set_link("c2", data=False)
    with pytest.raises(FerryError, match="sent nothing for 3s"):
        job.wait(timeout=60)
    assert time.monotonic() - cut_at < STALL_S + 15
    info = fleet.client.call("c1", "dominfo", domain=g.name)
    assert info["state"] == "running", "a live migration never paused it"
    done = fleet.client.call("c1", "domjobinfo", domain=g.name, completed=True)
    assert done["type"] == "failed" and "network to the dest cut" in done["error"]
    # The broker path was up: Finish (cancelled) discarded the incoming QEMU already.
    wait_for(lambda: not _qemus_in(fleet, "c2", g), 20, "c2's incoming QEMU to go")
    fleet.fleet.set_link("c2", data=True)
    before = g.wait_tick()
    assert g.wait_kept_running().count > before.count
    assert fleet.running_on(g) == ["c1"]


def test_cutting_the_dest_off_entirely_during_perform_keeps_the_guest_on_the_source_and_the_dest_cleans_up_when_back(  # noqa: E501
        fleet: FleetRun) -> None:
    g = fleet.boot("c1", fleet.guest())
    job = fleet.client.migrate(g.name, "c1", "c2", live=True, bandwidth_mib_s=BANDWIDTH)
    _streaming(fleet, g)
    fleet.fleet.set_link("c2", data=False, broker=False)
    seen: list[str] = []

    def stopped() -> bool:
        # QEMU 7.2 with the return path on ends a cancelled outgoing migration `failed`
        # now and then (its return-path thread sees the socket shut down first)
        seen.append(_query_migrate(fleet, "c1", g))
        return seen[-1] in ("cancelled", "failed")

    try:
        wait_for(stopped, STALL_S + 15, "the source to cancel the stalled stream")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; the source's QEMU said {seen[-3:]}") from None
    info = fleet.client.call("c1", "dominfo", domain=g.name)
    assert info["state"] == "running", "the guest never stopped on the source"
    assert _qemus_in(fleet, "c2", g), "c2, cut off, has not heard yet"
    fleet.fleet.set_link("c2", data=True, broker=True)
    with pytest.raises(FerryError, match="sent nothing"):
        job.wait(timeout=120)
    wait_for(lambda: not _qemus_in(fleet, "c2", g), 30, "c2's incoming QEMU to be reaped")
    assert fleet.client.call("c1", "dominfo", domain=g.name)["state"] == "running"
    assert fleet.running_on(g) == ["c1"]


def test_a_p2p_source_gives_up_on_a_dest_cut_off_and_the_dest_discards_its_guest_when_back(
        fleet: FleetRun) -> None:
    g = fleet.boot("c1", fleet.guest())
    job = fleet.client.migrate(g.name, "c1", "c2", live=True, p2p=True,
                               bandwidth_mib_s=BANDWIDTH)
    _streaming(fleet, g)
    fleet.fleet.set_link("c2", data=False, broker=False)
    with pytest.raises(FerryError, match="sent nothing"):
        job.wait(timeout=60)  # the stall, then Finish unanswered for 5 s: the source ends
    info = fleet.client.call("c1", "dominfo", domain=g.name)
    assert info["state"] == "running"
    assert _qemus_in(fleet, "c2", g), "c2, cut off, has not heard yet"
    fleet.fleet.set_link("c2", data=True, broker=True)
    # Its late Finish belongs to an ended job and runs nothing; the sweeper discards.
    wait_for(lambda: not _qemus_in(fleet, "c2", g), 30, "c2's incoming QEMU to be reaped")
    assert fleet.running_on(g) == ["c1"]


def test_a_cut_after_the_switch_over_leaves_the_source_paused_until_the_dest_finishes(
        fleet: FleetRun) -> None:
    g = fleet.boot("c1", fleet.guest())
    job = fleet.client.migrate(g.name, "c1", "c2", live=True, bandwidth_mib_s=BANDWIDTH)
    _streaming(fleet, g)
    # c2 loses the broker while the stream still flows; lifting the bandwidth lets the
    # migration converge: the switch-over happens, and then c2 is cut off entirely.
    fleet.fleet.set_link("c2", broker=False)
    job.set_speed(0)

    def switched() -> bool:
        info = fleet.client.call("c1", "dominfo", domain=g.name)
        return (info["state"], info["reason"]) == ("paused", "migration")

    wait_for(switched, 30, "the switch-over (source paused:migration)")
    fleet.fleet.set_link("c2", data=False)
    wait_for(lambda: fleet.client.call("c1", "domjobinfo", domain=g.name)["phase"] ==
             "perform3_done", 10, "Perform to end on c1")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # c2 cannot run Finish: c1 waits, paused
        info = fleet.client.call("c1", "dominfo", domain=g.name)
        assert (info["state"], info["reason"]) == ("paused", "migration")
        assert fleet.client.call("c1", "domjobinfo", domain=g.name)["phase"] == \
            "perform3_done"
        time.sleep(0.25)
    fleet.fleet.set_link("c2", data=True, broker=True)
    summary = job.wait(timeout=120)
    assert summary["result"] == "completed", summary["error"]
    assert [p["phase"] for p in summary["phases"]] == \
        ["begin3", "prepare", "perform3", "finish3", "confirm3"]
    assert fleet.running_on(g) == ["c2"]
    wait_for(lambda: not _qemus_in(fleet, "c1", g), 20, "the source QEMU to go")
    before = g.wait_tick()
    assert g.wait_kept_running().count > before.count
