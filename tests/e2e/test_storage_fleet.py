"""Storage copy between namespace hosts with their own storage: each host has its own
network namespace and a mount namespace in which the fleet's disk directory holds that
host's files, so the guest's disk has one path and different files on each host, as
with local disks on separate machines; no --xml is needed.  The network is cut for
real (the dest's migration link goes down) while the disks are copied."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import wait_for
from tests.conftest import FleetRun, Guest, fleet_of, qemu_pids_of, wait_info
from tests.e2e.storagekit import log_complete, make_log_image, no_copy_left_in
from workers.errors import FerryError

A, B = "sa", "sb"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, base_image: Path) -> Iterator[FleetRun]:
    with fleet_of([A, B], base_image, env={"FERRY_MIGRATION_STALL_TIMEOUT_S": "5"},
                  local_disks=True) as run:
        run.image = make_log_image(tmp_path_factory.mktemp("fleet-storage"))
        yield run


@pytest.fixture(autouse=True)
def guests_removed(fleet: FleetRun) -> Iterator[None]:
    yield
    fleet.remove_guests()


def local_guest(fleet: FleetRun, host: str) -> Guest:
    """A guest whose disk is at the fleet's disk path, a file on `host` only."""
    assert fleet.fleet.local_disks is not None
    name = f"g-{uuid.uuid4().hex[:8]}"
    shutil.copyfile(fleet.image, fleet.fleet.host_disks(host) / f"{name}.qcow2")
    disk = fleet.fleet.local_disks / f"{name}.qcow2"
    serial = fleet.work / f"{name}.serial"
    dom_uuid = str(uuid.uuid4())
    xml = guest_xml(name, disk, serial, memory_mib=32, uuid=dom_uuid, domain_type="qemu",
                    disk_format="qcow2")
    return Guest(name, dom_uuid, xml, disk, serial)


def test_a_guest_on_a_local_disk_moves_to_a_host_with_its_own_storage(
        fleet: FleetRun) -> None:
    g = fleet.boot(A, local_guest(fleet, A))
    g.wait_counter_above(3, timeout=60)
    mine, theirs = (fleet.fleet.host_disks(h) / g.disk.name for h in (A, B))
    assert mine.exists() and not theirs.exists()
    summary = fleet.client.migrate(g.name, A, B, live=True, copy_storage_all=True).wait(
        timeout=180)
    assert summary["result"] == "completed"
    wait_info(fleet.client, B, g.name, lambda i: i["state"] == "running")
    assert theirs.exists() and mine.exists()  # the source keeps its image
    g.wait_kept_running(more=5, timeout=30)
    log_complete(fleet.client, B, g, theirs)


def test_a_network_cut_mid_copy_ends_with_the_stall_timeout_and_a_retry_continues(
        fleet: FleetRun) -> None:
    """The cut copy fails after the stall timeout, the guest runs on at home with every
    write; the dest keeps its partial image, so the retry once the link is back copies
    only what the source's bitmap holds."""
    g = fleet.boot(A, local_guest(fleet, A))
    g.wait_counter_above(3, timeout=60)
    theirs = fleet.fleet.host_disks(B) / g.disk.name
    job = fleet.client.migrate(g.name, A, B, live=True, copy_storage_all=True,
                               bandwidth_mib_s=1)

    def copying() -> bool:
        info = job.info()
        return bool(info.get("disk_processed")) and (info.get("disk_remaining") or 0) > 0

    wait_for(copying, 60, "the disk copy to run")
    fleet.fleet.set_link(B, data=False)
    try:
        job.set_speed(0)
        with pytest.raises(FerryError, match="disk copy sent nothing for 5s"):
            job.wait(timeout=120)
    finally:
        fleet.fleet.set_link(B, data=True)
    info = wait_info(fleet.client, A, g.name, lambda i: i["state"] == "running")
    wait_for(lambda: qemu_pids_of(g.uuid) == [info["pid"]], 30, "the dest QEMU to go")
    assert no_copy_left_in(fleet.client, A, g.name)
    log_complete(fleet.client, A, g, fleet.fleet.host_disks(A) / g.disk.name)
    assert theirs.exists(), "the dest did not keep its partial image for a retry"
    summary = fleet.client.migrate(g.name, A, B, live=True,
                                   copy_storage_all=True).wait(timeout=180)
    assert summary["result"] == "completed"
    stats = summary["statistics"]
    assert stats.get("disk_reused", 0) > 0, stats  # the part sent before the cut
    wait_info(fleet.client, B, g.name, lambda i: i["state"] == "running")
    g.wait_kept_running(more=5, timeout=30)
    log_complete(fleet.client, B, g, theirs)
