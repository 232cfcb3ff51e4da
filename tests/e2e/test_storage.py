"""Storage copy (--copy-storage-all / --copy-storage-inc) on real workers and QEMU.

Both hosts run on this machine, so each guest's disk has one path on the source
and another on the dest (the dest's definition comes in with --xml, whose disk
source path may differ: the ABI check allows it).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from scripts.testbed.guestimage import build_image, read_disk_log
from tasks.client import Client
from tests.conftest import Guest, qemu_pids_of, wait_info

LOG_SECTORS = 4096  # the guest's disk log ring: 2 MiB from 1 MiB on


def dest_xml(guest: Guest, dest_disk: Path) -> str:
    return guest.xml.replace(f"file='{guest.disk}'", f"file='{dest_disk}'")


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                          text=True).stdout


def same_images(a: Path, b: Path) -> bool:
    done = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)],
                          capture_output=True, text=True)
    return done.returncode == 0


def boot(client: Client, guest: Guest, host: str = "alpha") -> None:
    client.call(host, "define", xml=guest.xml)
    client.call(host, "start", domain=guest.name)


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


@pytest.fixture(scope="module")
def log_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB qcow2 (128 KiB clusters) whose guest logs every counter to its disk
    every 20 ms, with 24 MiB of random data at 8 MiB so a copy takes a moment."""
    root = tmp_path_factory.mktemp("storage-img")
    raw = build_image(root / "log.raw", log_sectors=LOG_SECTORS, size=64 << 20,
                      counter_interval_ms=20)
    with open(raw, "r+b") as f:
        f.seek(8 << 20)
        f.write(os.urandom(24 << 20))
    out = root / "log.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=131072", str(raw),
             str(out))
    return out


def logging_guest(make_guest: Callable[..., Guest], image: Path) -> Guest:
    return make_guest(image=image, disk_format="qcow2")


def image_info(path: Path) -> dict[str, object]:
    return dict(json.loads(qemu_img("info", "-U", "--output=json", str(path))))


class JobWatch:
    """domjobinfo of a running migration, sampled until it ends (no sleeps as sync: the
    samples are only looked at afterwards)."""

    def __init__(self, client: Client, host: str, name: str) -> None:
        self.samples: list[dict[str, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(client, host, name),
                                        daemon=True)
        self._thread.start()

    def _run(self, client: Client, host: str, name: str) -> None:
        while not self._stop.is_set():
            try:
                info = client.call(host, "domjobinfo", domain=name, timeout=10)
            except Exception:
                info = {}
            if info.get("type") == "unbounded":
                self.samples.append(info)
            self._stop.wait(0.1)

    def stop(self) -> list[dict[str, object]]:
        self._stop.set()
        self._thread.join(timeout=15)
        return self.samples


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
