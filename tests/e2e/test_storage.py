"""Storage copy (--copy-storage-all / --copy-storage-inc) on real workers and QEMU: the
disks move with the guest, no write it makes during the copy is lost.  (Faults and bad
input: test_storage_faults.py.)"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from scripts.testbed.guestimage import read_disk_log
from tasks.client import Client
from tests.conftest import CliResult, Guest, qemu_pids_of, wait_info
from tests.e2e.storagekit import (
    LOG_SECTORS,
    JobWatch,
    boot,
    dest_xml,
    image_info,
    make_log_image,
    qemu_img,
    same_images,
)


def test_copy_storage_all_moves_a_guest_to_a_dest_without_its_disk(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    guest = make_guest()
    boot(client, guest)
    count = guest.wait_counter_above(0)
    dest_disk = tmp_path / "dest" / guest.disk.name
    dest_disk.parent.mkdir()
    job = client.migrate(guest.name, "alpha", "beta", live=True, copy_storage_all=True,
                         xmlin=dest_xml(guest, dest_disk))
    summary = job.wait(timeout=120)
    assert summary["result"] == "completed"
    assert dest_disk.exists() and guest.disk.exists()  # the source keeps its image
    stats = summary["statistics"]
    assert stats["disk_total"] >= 512 * 1024 and stats["disk_remaining"] == 0
    guest.wait_counter_above(count + 3)
    wait_info(client, "beta", guest.name, lambda i: i["state"] == "running")
    client.call("beta", "suspend", domain=guest.name)
    assert same_images(guest.disk, dest_disk)
    assert len(qemu_pids_of(guest.uuid)) == 1
    # And back, to a third path: the leases of each host's own copy only need to be free.
    client.call("beta", "resume", domain=guest.name)
    back = tmp_path / "back.img"
    xml_back = guest.xml.replace(f"file='{guest.disk}'", f"file='{back}'")
    assert client.migrate(guest.name, "beta", "alpha", live=True, copy_storage_all=True,
                          xmlin=xml_back).wait(timeout=120)["result"] == "completed"
    assert wait_info(client, "alpha", guest.name, lambda i: i["state"] == "running")
    locks = client.call("alpha", "domlocks", domain=guest.name)
    assert f"disk:{back}" in locks["leases"] and locks["held_here"] is True


@pytest.fixture(scope="module")
def log_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_log_image(tmp_path_factory.mktemp("storage-img"))


def logging_guest(make_guest: Callable[..., Guest], image: Path) -> Guest:
    return make_guest(image=image, disk_format="qcow2")


def test_no_guest_write_is_lost_while_its_qcow2_disk_is_copied_and_the_ram_follows(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path,
        log_image: Path) -> None:
    guest = logging_guest(make_guest, log_image)
    boot(client, guest)
    count = guest.wait_counter_above(5, timeout=60)
    dest_disk = tmp_path / "dest" / "disk.qcow2"
    dest_disk.parent.mkdir()
    watch = JobWatch(client, "alpha", guest.name)
    try:
        job = client.migrate(guest.name, "alpha", "beta", live=True, copy_storage_all=True,
                             bandwidth_mib_s=16, xmlin=dest_xml(guest, dest_disk))
        summary = job.wait(timeout=180)
    finally:
        samples = watch.stop()
    assert summary["result"] == "completed"
    # The guest kept writing on the source during the copy, and goes on on the dest.
    after = guest.wait_counter_above(guest.counters()[-1] + 10, timeout=60)
    assert after > count + 10
    client.call("beta", "suspend", domain=guest.name)
    printed = guest.counters()[-1]
    log = read_disk_log(dest_disk, "qcow2", LOG_SECTORS)
    assert log.corrupt == () and log.missing(printed) == []
    assert log.head is not None and log.head >= printed
    info = image_info(dest_disk)
    assert (info["format"], info["cluster-size"], info["virtual-size"]) == (
        "qcow2", 131072, 64 << 20)
    # Progress: the disks first (data = disks only), then memory and disks together.
    disks_only = [s for s in samples if s.get("disk_total") and
                  s["data_total"] == s["disk_total"]]
    together = [s for s in samples if s.get("disk_total") and
                s["data_total"] > s["disk_total"]]  # type: ignore[operator]
    assert disks_only and together, samples[:3]
    assert samples.index(disks_only[0]) < samples.index(together[0])
    assert {s["phase"] for s in disks_only} == {"perform3"}
    assert [p["phase"] for p in summary["phases"]] == [
        "begin3", "prepare", "perform3", "finish3", "confirm3"]
    stats = summary["statistics"]
    assert stats["disk_total"] >= 24 << 20 and stats["disk_processed"] == stats["disk_total"]
    assert 0 < stats["disk_copy_ms"] < stats["time_elapsed"] and stats["disk_bps"] > 0


def test_a_paused_guests_disk_arrives_identical_and_it_stays_paused(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path,
        log_image: Path) -> None:
    guest = logging_guest(make_guest, log_image)
    boot(client, guest)
    guest.wait_counter_above(3, timeout=60)
    client.call("alpha", "suspend", domain=guest.name)
    dest_disk = tmp_path / "dest.qcow2"
    summary = client.migrate(guest.name, "alpha", "beta", live=True, copy_storage_all=True,
                             xmlin=dest_xml(guest, dest_disk)).wait(timeout=120)
    assert summary["result"] == "completed"
    assert client.call("beta", "dominfo", domain=guest.name)["state"] == "paused"
    assert same_images(guest.disk, dest_disk)
    # Sparse stays sparse: the dest holds about what the source holds, not 64 MiB.
    assert image_info(dest_disk)["actual-size"] < 40 << 20  # type: ignore[operator]


@pytest.fixture(scope="module")
def layered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base.raw, top.qcow2 naming 'base.raw' as its backing file): the guest boots from
    the base and logs into the top."""
    root = tmp_path_factory.mktemp("storage-layers")
    base_qcow2 = make_log_image(root)
    base = root / "base.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(base_qcow2), str(base))
    top = root / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", "base.raw",
             "-F", "raw", str(top))
    return base, top


def test_copy_storage_inc_copies_only_the_top_image_over_the_dests_own_backing_file(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path,
        layered: tuple[Path, Path]) -> None:
    base, top = layered
    shutil.copyfile(base, tmp_path / "base.raw")  # the source's backing file
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    shutil.copyfile(base, dest_dir / "base.raw")  # the dest has the chain below the top
    guest = make_guest(image=top, disk_format="qcow2")
    boot(client, guest)
    guest.wait_counter_above(5, timeout=60)
    dest_disk = dest_dir / "top.qcow2"
    summary = client.migrate(guest.name, "alpha", "beta", live=True, copy_storage_inc=True,
                             xmlin=dest_xml(guest, dest_disk)).wait(timeout=120)
    assert summary["result"] == "completed" and "non_shared_inc" in summary["flags"]
    info = image_info(dest_disk)
    assert (info["backing-filename"], info["cluster-size"]) == ("base.raw", 65536)
    assert info["full-backing-filename"] == str(dest_dir / "base.raw")
    # Only the top layer travelled: the log, not the 24 MiB of random data in the base.
    assert summary["statistics"]["disk_total"] < 8 << 20
    guest.wait_counter_above(guest.counters()[-1] + 5, timeout=30)
    client.call("beta", "suspend", domain=guest.name)
    printed = guest.counters()[-1]
    log = read_disk_log(dest_disk, "qcow2", LOG_SECTORS)
    assert log.corrupt == () and log.missing(printed) == []


def test_dry_run_says_what_would_be_copied_and_starts_nothing(
        ferry: Callable[..., CliResult], client: Client, make_guest: Callable[..., Guest],
        tmp_path: Path, log_image: Path) -> None:
    guest = logging_guest(make_guest, log_image)
    boot(client, guest)
    dest_disk = tmp_path / "dest" / "disk.qcow2"
    dest_disk.parent.mkdir()
    xml = tmp_path / "dest.xml"
    xml.write_text(dest_xml(guest, dest_disk))
    args = ("migrate", "-H", "alpha", guest.name, "beta", "--live", "--copy-storage-all",
            "--xml", str(xml), "--dry-run")
    res = ferry(*args, "--json")
    assert res.rc == 0, res.err
    report = json.loads(res.out)
    [disk] = report["disks"]
    assert (disk["target"], disk["image"], disk["path"], disk["source_path"]) == (
        "hda", "create", str(dest_disk), str(guest.disk))
    assert disk["copy_bytes"] >= 24 << 20 and disk["capacity"] == 64 << 20
    assert report["copy_bytes"] == disk["copy_bytes"] and report["nbd"].startswith("127.0.0.1:")
    human = ferry(*args)
    assert human.rc == 0 and "hda" in human.out and "create" in human.out
    # Nothing started or made anywhere.
    assert not dest_disk.exists() and len(qemu_pids_of(guest.uuid)) == 1
    assert client.call("alpha", "domjobinfo", domain=guest.name)["type"] == "none"
    assert all(d["name"] != guest.name for d in client.call("beta", "list", all=True))
    # An existing image would be used; a missing backing file for inc is the real error.
    shutil.copyfile(guest.disk, dest_disk)
    again = json.loads(ferry(*args, "--json").out)
    assert again["disks"][0]["image"] == "use existing"
    bad = ferry("migrate", "-H", "alpha", guest.name, "beta", "--live", "--copy-storage-all",
                "--migrate-disks", "vdq", "--dry-run")
    assert bad.rc == 1 and "disk target vdq not found" in bad.err


def test_peer_to_peer_copies_the_disks_too(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path,
        log_image: Path) -> None:
    guest = logging_guest(make_guest, log_image)
    boot(client, guest)
    guest.wait_counter_above(5, timeout=60)
    dest_disk = tmp_path / "p2p.qcow2"
    summary = client.migrate(guest.name, "alpha", "beta", live=True, p2p=True,
                             copy_storage_all=True,
                             xmlin=dest_xml(guest, dest_disk)).wait(timeout=120)
    assert summary["result"] == "completed" and "peer2peer" in summary["flags"]
    assert [p["phase"] for p in summary["phases"]] == [
        "begin3", "prepare", "perform3", "finish3", "confirm3"]
    wait_info(client, "beta", guest.name, lambda i: i["state"] == "running")
    guest.wait_counter_above(guest.counters()[-1] + 3, timeout=30)
    client.call("beta", "suspend", domain=guest.name)
    log = read_disk_log(dest_disk, "qcow2", LOG_SECTORS)
    assert log.corrupt == () and log.missing(guest.counters()[-1]) == []
