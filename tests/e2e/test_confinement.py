"""QEMU confined as libvirt confines it: an unprivileged user, the seccomp sandbox,
images handed to that user while the guest runs and given back after, serial files
and sockets handed over as fds."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scripts.testbed.stack import Stack, wait_for
from tasks.client import Client
from tests.conftest import (
    Guest,
    assert_confined,
    proc_status,
    qemu_pids_of,
    remove_guest,
    wait_info,
)
from workers import dac
from workers.errors import FerryError

QEMU_USER = "ferry-qemu"


def owner(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid


def xattrs(path: Path) -> dict[str, str]:
    return {name: os.getxattr(path, name).decode() for name in os.listxattr(path)
            if name.startswith("trusted.ferry.")}


def _start(client: Client, guest: Guest, host: str = "alpha") -> int:
    client.call(host, "define", xml=guest.xml)
    info = client.call(host, "start", domain=guest.name)
    return int(info["pid"])


def test_qemu_runs_as_its_user_under_seccomp_holding_its_image_only_while_it_runs(
        client: Client, make_guest: Callable[..., Guest], stack: Stack) -> None:
    vnc = "\n    <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>"
    guest = make_guest(extra_devices=vnc)
    before = owner(guest.disk)
    pid = _start(client, guest)
    guest.wait_counter_above(0)

    status = proc_status(pid)
    qemu = pwd.getpwnam(QEMU_USER)
    assert status["Uid"].split() == [str(qemu.pw_uid)] * 4
    assert_confined(pid)
    assert owner(guest.disk) == (qemu.pw_uid, qemu.pw_gid)
    assert xattrs(guest.disk) == {dac.OWNER: f"+{before[0]}:+{before[1]}", dac.REFS: "1",
                                  dac.STAMP: dac.boot_time()}
    # The worker wrote the pidfile (QEMU's user cannot write the state dir).
    assert (stack.root / "alpha" / "run" / f"{guest.name}.pid").read_text().strip() == str(pid)
    vncinfo = client.call("alpha", "qemu_monitor_command", domain=guest.name,
                          command='{"execute": "query-vnc"}')
    assert vncinfo["enabled"] is True  # graphics listen as the unprivileged user

    client.call("alpha", "destroy", domain=guest.name)
    assert owner(guest.disk) == before and xattrs(guest.disk) == {}


def test_a_qemu_told_to_spawn_a_process_is_killed_by_its_sandbox_and_reported_crashed(
        client: Client, make_guest: Callable[..., Guest], stack: Stack,
        tmp_path: Path) -> None:
    guest = make_guest()
    pid = _start(client, guest)
    witness = tmp_path / "PWNED"
    with contextlib.suppress(FerryError):  # the monitor goes with QEMU
        client.call("alpha", "qemu_monitor_command", domain=guest.name, hmp=True,
                    command=f'migrate "exec:touch {witness}"')

    info = wait_info(client, "alpha", guest.name, lambda i: i["state"] == "shutoff",
                     what="the guest to be reported down")
    assert info["reason"] == "crashed"
    assert not witness.exists() and not qemu_pids_of(guest.uuid)
    log = stack.root / "alpha" / "worker.log"
    wait_for(lambda: f"domain {guest.name}: QEMU was killed by its seccomp sandbox (SIGSYS)"
             in log.read_text(), 10, "the SIGSYS log line")
    assert f"QEMU pid {pid} exited (status -31)" in log.read_text()


def test_a_guest_whose_disk_the_qemu_user_cannot_reach_is_refused_at_start(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    guest = make_guest()
    disk = private / "disk.img"
    guest.disk.rename(disk)
    xml = guest.xml.replace(str(guest.disk), str(disk))
    client.call("alpha", "define", xml=xml)

    with pytest.raises(FerryError) as err:
        client.call("alpha", "start", domain=guest.name)

    assert str(err.value) == (f"host alpha: the QEMU user {QEMU_USER} cannot reach disk hda "
                              f"{disk}: directory {private} is not searchable by it (give it "
                              "o+x, or move the file)")
    info = client.call("alpha", "dominfo", domain=guest.name)
    assert info["state"] == "shutoff" and not qemu_pids_of(guest.uuid)
    assert owner(disk) == (0, 0) and xattrs(disk) == {}


def test_a_migration_on_a_shared_image_counts_both_qemus_and_the_last_gives_it_back(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest()
    before = owner(guest.disk)
    _start(client, guest)
    count = guest.wait_counter_above(0)

    client.migrate(guest.name, "alpha", "beta", live=True).wait(timeout=120)

    # The dest took the image (two users), the source let go of it without giving it back.
    assert xattrs(guest.disk)[dac.REFS] == "1"
    assert owner(guest.disk) == (pwd.getpwnam(QEMU_USER).pw_uid, pwd.getpwnam(QEMU_USER).pw_gid)
    guest.wait_counter_above(count + 3)  # the dest QEMU got its image lock and runs
    for pid in qemu_pids_of(guest.uuid):
        assert_confined(pid)
    client.call("beta", "destroy", domain=guest.name)
    assert owner(guest.disk) == before and xattrs(guest.disk) == {}


def test_a_restarted_worker_gives_the_image_back_when_its_guest_goes(
        client: Client, make_guest: Callable[..., Guest], stack: Stack) -> None:
    host = "confw"
    stack.start_worker(host)
    try:
        guest = make_guest()
        before = owner(guest.disk)
        pid = _start(client, guest, host)
        stack.kill_worker(host)
        stack.start_worker(host)
        info = client.call(host, "dominfo", domain=guest.name)
        assert info["pid"] == pid and info["state"] == "running"
        client.call(host, "destroy", domain=guest.name)
        assert owner(guest.disk) == before and xattrs(guest.disk) == {}
    finally:
        with contextlib.suppress(Exception):  # through ferry: no state file outlives it
            for dom in client.call(host, "list", all=True, timeout=30):
                remove_guest(client, host, dom["name"])
        stack.remove_worker(host)


@pytest.fixture
def private() -> Iterator[Path]:
    """A directory only root may enter (0700), with a short path (unix sockets)."""
    path = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_serial_files_and_sockets_are_handed_over_so_their_directories_stay_private(
        client: Client, make_guest: Callable[..., Guest], private: Path) -> None:
    sock = private / "console.sock"
    extra = (f"\n    <serial type='unix'><source mode='bind' path='{sock}'/>"
             "<target port='1'/></serial>")
    guest = make_guest(extra_devices=extra)
    serial = private / "serial.log"
    xml = guest.xml.replace(str(guest.serial), str(serial))
    guest = Guest(guest.name, guest.uuid, xml, guest.disk, serial)
    _start(client, guest)
    guest.wait_counter_above(0)  # QEMU wrote into a file it could not open itself
    assert owner(serial) == (0, 0)
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(sock))  # QEMU listens on the socket the worker bound
    chardevs = client.call("alpha", "qemu_monitor_command", domain=guest.name,
                           command=json.dumps({"execute": "query-chardev"}))
    assert {c["label"] for c in chardevs} >= {"charserial0", "charserial1"}
