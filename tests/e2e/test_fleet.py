"""Hosts with their own addresses (network namespaces, scripts/testbed/fleet.py).

On one machine every host of the usual test stack shares 127.0.0.1; here each
host is a namespace with its own migration address, so a port opened on the
wrong interface or an address taken from the wrong place shows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.testbed.fleet import socket_inodes
from scripts.testbed.stack import wait_for
from tests.conftest import FleetRun, fleet_of, qemu_pids_of

# n3 waits 3 s before it starts QEMU's migration: long enough to see the dest listen.
SLOW_SOURCE = {"FERRY_FAILPOINTS": "perform3.before_migrate=slow"}


@pytest.fixture(scope="module")
def fleet(base_image: Path) -> Iterator[FleetRun]:
    with fleet_of(["n1", "n2", "n3"], base_image, host_env={"n3": SLOW_SOURCE}) as run:
        yield run


@pytest.fixture(autouse=True)
def guests_removed(fleet: FleetRun) -> Iterator[None]:
    yield
    fleet.remove_guests()


def test_every_host_announces_its_own_namespace_address(fleet: FleetRun) -> None:
    hosts = {h["name"]: h for h in fleet.client.hosts()}
    for name, host in fleet.fleet.hosts.items():
        assert hosts[name]["address"] == host.address
        assert hosts[name]["alive"]
    assert len({h.address for h in fleet.fleet.hosts.values()}) == 3


def test_incoming_qemu_listens_on_the_dest_namespace_address_and_the_guest_moves(
        fleet: FleetRun) -> None:
    g = fleet.boot("n3", fleet.guest())
    before = g.wait_tick()
    dest = fleet.fleet.hosts["n2"]
    job = fleet.client.migrate(g.name, "n3", "n2", live=True)

    def incoming_qemu() -> int:
        pids = [p for p in qemu_pids_of(g.uuid)
                if os.stat(f"/proc/{p}/ns/net").st_ino == fleet.fleet.netns_inode("n2")]
        return pids[0] if pids else 0

    pid = int(wait_for(incoming_qemu, 20, "the incoming QEMU in n2's namespace"))

    def its_listener() -> list[tuple[str, int, int]]:
        mine = socket_inodes(pid)
        return [entry for entry in fleet.fleet.listeners("n2") if entry[2] in mine]

    listening = wait_for(its_listener, 5, "the incoming QEMU to listen")
    assert [(addr, port) for addr, port, _ in listening] == \
        [(dest.address, port) for _, port, _ in listening]
    assert all(49152 <= port <= 49215 for _, port, _ in listening)

    summary = job.wait(timeout=90)
    assert summary["result"] == "completed", summary["error"]
    assert fleet.running_on(g) == ["n2"]
    assert g.wait_kept_running().count > before.count  # the same boot, counting on
    assert incoming_qemu() == pid, "the guest runs in the QEMU that listened in n2"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop the capabilities")
def test_without_the_capabilities_the_fleet_says_why_instead_of_failing() -> None:
    probe = "from scripts.testbed.fleet import netns_available; print(netns_available())"
    proc = subprocess.run(["setpriv", "--bounding-set=-sys_admin,-net_admin", sys.executable,
                           "-c", probe], capture_output=True, text=True, timeout=60,
                          check=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout.startswith("cannot create network namespaces: ")
    assert "not permitted" in proc.stdout
