"""A storage copy interrupted midway and retried to the same dest copies only what
changed: the source keeps its dirty bitmap, the dest its partial image (for
FERRY_STORAGE_RETRY_KEEP_S), and the dest's disk after the retry holds every write the
guest made.  Any doubt (another dest, the keep time over) is a full copy.  The source is
host gamma with FERRY_STORAGE_RESUMABLE on (off by default: see docs/limits.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scripts.testbed.stack import Stack, wait_for
from tasks.client import Client
from tests.conftest import Guest, wait_info
from tests.e2e.storagekit import (
    boot,
    dest_xml,
    expire,
    kept_records,
    log_complete,
    make_log_image,
    qmp,
)
from workers.errors import FerryError

DISK = 64 << 20  # the log image's virtual size: what a full copy sends


@pytest.fixture(scope="module")
def log_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_log_image(tmp_path_factory.mktemp("storage-retry"))


@pytest.fixture
def src(faulty_host: Callable[..., str]) -> str:
    """Source host gamma, copying disks with backup jobs and dirty bitmaps."""
    return faulty_host("", FERRY_STORAGE_RESUMABLE="1")


@pytest.fixture
def guest(client: Client, make_guest: Callable[..., Guest], log_image: Path,
          src: str) -> Guest:
    g = make_guest(image=log_image, disk_format="qcow2")
    boot(client, g, src)
    g.wait_counter_above(3, timeout=60)
    return g


def bitmaps(client: Client, guest: Guest, host: str = "gamma") -> dict[str, int]:
    """The source's ferry bitmaps on the guest's disk."""
    [entry] = [b for b in qmp(client, host, guest.name, "query-block") if b.get("inserted")]
    return {b["name"]: b["count"] for b in entry["inserted"].get("dirty-bitmaps", [])
            if str(b.get("name", "")).startswith("ferry-")}


def cut_midway(client: Client, guest: Guest, dest: str, dest_disk: Path) -> str:
    """A copy at 4 MiB/s aborted once half the disk went; the job's id."""
    job = client.migrate(guest.name, "gamma", dest, live=True, copy_storage_all=True,
                         bandwidth_mib_s=4, xmlin=dest_xml(guest, dest_disk))
    wait_for(lambda: (job.info().get("disk_processed") or 0) >= DISK // 2, 120,
             "half the disk to be copied")
    job.abort()
    with pytest.raises(FerryError, match="operation aborted"):
        job.wait(timeout=60)
    wait_info(client, "gamma", guest.name, lambda i: i["state"] == "running")
    return job.id


def retry(client: Client, guest: Guest, dest: str, dest_disk: Path) -> dict[str, Any]:
    summary = client.migrate(guest.name, "gamma", dest, live=True, copy_storage_all=True,
                             xmlin=dest_xml(guest, dest_disk)).wait(timeout=180)
    assert summary["result"] == "completed"
    wait_info(client, dest, guest.name, lambda i: i["state"] == "running")
    guest.wait_counter_above(guest.counters()[-1] + 3, timeout=30)
    log_complete(client, dest, guest, dest_disk)  # every write the guest made is there
    return dict(summary["statistics"])


def test_a_copy_cut_midway_and_retried_to_the_same_dest_copies_only_what_changed(
        client: Client, guest: Guest, tmp_path: Path, stack: Stack) -> None:
    dest_disk = tmp_path / "d.qcow2"
    first = cut_midway(client, guest, "beta", dest_disk)
    assert list(bitmaps(client, guest)) == [f"ferry-{first}"]  # the source keeps it
    assert dest_disk.exists()  # and the dest its partial image, recorded
    [rec] = [r for r in kept_records(stack, "beta") if r["path"] == str(dest_disk)]
    assert (rec["attempt"], rec["uuid"], rec["source"]) == (first, guest.uuid, "gamma")
    stats = retry(client, guest, "beta", dest_disk)
    assert stats["disk_reused"] >= DISK // 3
    assert stats["disk_processed"] <= DISK * 6 // 10, stats  # the bound: 0.6
    assert stats["disk_handover_ms"] >= 0
    assert not [r for r in kept_records(stack, "beta") if r["path"] == str(dest_disk)]


def test_the_partial_image_goes_after_the_keep_time_and_the_retry_copies_everything(
        client: Client, guest: Guest, tmp_path: Path, stack: Stack) -> None:
    dest_disk = tmp_path / "d.qcow2"
    cut_midway(client, guest, "beta", dest_disk)
    expire(stack, "beta", dest_disk)
    # the image goes first, then its record (a crash between leaves a record to sweep)
    wait_for(lambda: not dest_disk.exists() and not [
        r for r in kept_records(stack, "beta") if r["path"] == str(dest_disk)], 90,
        "the sweeper to remove the partial image and its record")
    stats = retry(client, guest, "beta", dest_disk)
    assert "disk_reused" not in stats and stats["disk_processed"] >= DISK, stats


def test_a_retry_to_another_dest_copies_everything(
        client: Client, guest: Guest, tmp_path: Path) -> None:
    first = cut_midway(client, guest, "beta", tmp_path / "beta.qcow2")
    assert list(bitmaps(client, guest)) == [f"ferry-{first}"]
    stats = retry(client, guest, "alpha", tmp_path / "alpha.qcow2")
    assert "disk_reused" not in stats and stats["disk_processed"] >= DISK, stats
