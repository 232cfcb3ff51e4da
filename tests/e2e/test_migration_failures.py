"""One test per failure point: exactly one copy of the guest, the first error reported."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from scripts.testbed.guestimage import build_image
from scripts.testbed.stack import wait_for
from tasks.client import Client
from tests.conftest import Guest, port_free, qemu_pids_of, wait_info
from tests.e2e.diskfaults import disk_locked
from workers.errors import FerryError


def _running_on_source(client: Client, guest: Guest, dest: str) -> None:
    info = wait_info(client, "alpha", guest.name, lambda i: i["state"] == "running",
                     what="the guest to run on the source again")
    assert info["reason"] in ("migration_canceled", "booted")
    assert info["pid"] in qemu_pids_of(guest.uuid)
    assert qemu_pids_of(guest.uuid) == [info["pid"]], "exactly one QEMU of the guest"
    assert all(d["name"] != guest.name for d in client.call(dest, "list", all=True))
    guest.wait_kept_running()  # the boot it started with: never restarted, never two


def _started(client: Client, make_guest: Callable[..., Guest], **kw: object) -> Guest:
    guest = make_guest(**kw)
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    guest.wait_tick()
    return guest


def test_dest_qemu_failing_to_start_in_prepare_leaves_the_guest_on_the_source(
        client: Client, make_guest: Callable[..., Guest],
        faulty_host: Callable[[str], str]) -> None:
    dest = faulty_host("prepare3.qemu_argv=bad-arg")
    guest = _started(client, make_guest)

    with pytest.raises(FerryError) as err:
        client.migrate(guest.name, "alpha", dest, live=True).wait(timeout=60)

    assert "prepare" in str(err.value) and "QEMU failed to start" in str(err.value)
    assert "ferry-failpoint-bad-option" in str(err.value), "the error carries QEMU's words"
    _running_on_source(client, guest, dest)
    # The guest never stopped, so it is still running as booted.
    assert client.call("alpha", "dominfo", domain=guest.name)["reason"] == "booted"


def test_cpus_failing_to_start_in_finish_kill_the_dest_and_resume_the_source(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    """A real failure of QEMU's `cont`: the dest's copy of the disk is locked by another
    process, so QEMU cannot take it for writing when its CPUs start."""
    guest = _started(client, make_guest)
    moved = tmp_path / "dest-copy.img"
    shutil.copyfile(guest.disk, moved)
    xmlin = guest.xml.replace(str(guest.disk), str(moved))
    with disk_locked(moved):
        job = client.migrate(guest.name, "alpha", "beta", live=True, xmlin=xmlin)
        with pytest.raises(FerryError) as err:
            job.wait(timeout=60)

    # The Finish error (QEMU's own words) survives Confirm's clean-up.
    assert "phase finish3" in str(err.value) and "cont" in str(err.value)
    assert '"write" lock' in str(err.value), "the error carries QEMU's reason"
    _running_on_source(client, guest, "beta")
    assert client.call("alpha", "dominfo", domain=guest.name)["reason"] == "migration_canceled"
    done = client.call("alpha", "domjobinfo", domain=guest.name, completed=True)
    assert done["type"] == "failed" and "finish3" in done["error"]


def _slow_guest(client: Client, make_guest: Callable[..., Guest], image_dir: object) -> Guest:
    from pathlib import Path

    assert isinstance(image_dir, Path)
    image = build_image(image_dir / "busy.img", dirty_mib=32, rate_mib_s=None)
    return _started(client, make_guest, memory_mib=128, image=image)


def _wait_perform(client: Client, guest: Guest) -> None:
    def copying() -> bool:
        info = client.call("alpha", "domjobinfo", domain=guest.name)
        return info["phase"] == "perform3" and (info["data_processed"] or 0) > 0

    wait_for(copying, 30, "Perform to be copying memory")


def test_incoming_qemu_killed_during_perform_fails_with_the_perform_error(
        client: Client, make_guest: Callable[..., Guest], image_dir: object) -> None:
    guest = _slow_guest(client, make_guest, image_dir)
    job = client.migrate(guest.name, "alpha", "beta", live=True, bandwidth_mib_s=4)
    _wait_perform(client, guest)
    dest_pids = [p for p in qemu_pids_of(guest.uuid)
                 if p != client.call("alpha", "dominfo", domain=guest.name)["pid"]]
    assert len(dest_pids) == 1

    os.kill(dest_pids[0], signal.SIGKILL)
    with pytest.raises(FerryError) as err:
        job.wait(timeout=60)

    assert "phase perform3" in str(err.value)
    _running_on_source(client, guest, "beta")
    prepare = client.app.AsyncResult(f"{job.id}.prepare3").get(timeout=5)
    port = int(prepare["uri"].rsplit(":", 1)[1])
    assert port_free(port), "the incoming migration port is free again"


def test_source_qemu_killed_during_perform_leaves_no_copy_running_anywhere(
        client: Client, make_guest: Callable[..., Guest], image_dir: object) -> None:
    guest = _slow_guest(client, make_guest, image_dir)
    src_pid = client.call("alpha", "dominfo", domain=guest.name)["pid"]
    job = client.migrate(guest.name, "alpha", "beta", live=True, bandwidth_mib_s=4)
    _wait_perform(client, guest)

    os.kill(src_pid, signal.SIGKILL)
    with pytest.raises(FerryError) as err:
        job.wait(timeout=60)

    assert "phase perform3" in str(err.value)
    wait_for(lambda: not qemu_pids_of(guest.uuid), 15, "every QEMU of the guest to be gone")
    info = client.call("alpha", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("shutoff", "crashed")
    assert all(d["name"] != guest.name for d in client.call("beta", "list", all=True))
