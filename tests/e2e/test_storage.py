"""Storage copy (--copy-storage-all / --copy-storage-inc) on real workers and QEMU.

Both hosts run on this machine, so each guest's disk has one path on the source
and another on the dest (the dest's definition comes in with --xml, whose disk
source path may differ: the ABI check allows it).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tasks.client import Client
from tests.conftest import Guest, qemu_pids_of, wait_info


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
