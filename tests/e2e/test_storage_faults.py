"""Storage copy under bad input and faults: each a clear one-line error, the guest runs on
the source on its own disk with every write it made, and nothing is left: no dest QEMU
(its NBD server and exports went with it), no image the dest created, no listening
port, no mirror or nbd node in the source QEMU."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scripts.testbed.stack import Stack, wait_for
from tasks.client import Client
from tests.conftest import CliResult, Guest, live_hosts, qemu_pids_of, wait_info
from tests.e2e.storagekit import (
    JobWatch,
    boot,
    dest_xml,
    expire,
    kept_records,
    listening,
    log_complete,
    make_log_image,
    no_copy_left_in,
    qemu_img,
    qmp,
    source_untouched,
)
from workers.errors import FerryError


@pytest.fixture(scope="module")
def log_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_log_image(tmp_path_factory.mktemp("storage-faults"))


@pytest.fixture
def guest(client: Client, make_guest: Callable[..., Guest], log_image: Path) -> Guest:
    """A running guest on alpha that logs its counters to its qcow2 disk."""
    g = make_guest(image=log_image, disk_format="qcow2")
    boot(client, g)
    g.wait_counter_above(3, timeout=60)
    return g


def migration_ports(stack: Stack) -> tuple[int, int]:
    low, _, high = stack.env().get("FERRY_MIGRATION_PORTS", "49152-49215").partition("-")
    return int(low), int(high)


def no_port_left(stack: Stack) -> None:
    low, high = migration_ports(stack)
    wait_for(lambda: not listening(low, high), 10, "the migration ports to be free")


def mirroring(client: Client, host: str, name: str) -> bool:
    info = client.call(host, "domjobinfo", domain=name)
    return bool(info.get("disk_processed")) and info.get("disk_remaining", 0) > 0


# -- bad input: refused before anything starts --------------------------------------------


def test_migrate_disks_naming_an_unknown_target_is_one_line_from_the_cli(
        ferry: Callable[..., CliResult], guest: Guest, tmp_path: Path, client: Client,
        stack: Stack) -> None:
    xml = tmp_path / "dest.xml"
    dest_disk = tmp_path / "d.qcow2"
    xml.write_text(dest_xml(guest, dest_disk))
    res = ferry("migrate", "-H", "alpha", guest.name, "beta", "--live", "--copy-storage-all",
                "--migrate-disks", "hda,vdz", "--xml", str(xml))
    assert res.rc == 1 and res.err.count("\n") == 1, res.err
    assert "disk target vdz not found" in res.err
    source_untouched(client, guest, dest_disk)
    no_port_left(stack)


def test_storage_copy_with_protocol_v2_is_refused_naming_the_cookie(
        ferry: Callable[..., CliResult]) -> None:
    res = ferry("migrate", "-H", "alpha", "any-guest", "beta", "--live",
                "--copy-storage-all", "--protocol", "2")
    assert res.rc == 1 and "protocol v3" in res.err and "NBD port" in res.err


def test_a_disk_missing_on_the_source_is_refused_at_begin(
        client: Client, guest: Guest, tmp_path: Path) -> None:
    moved = guest.disk.with_suffix(".away")
    guest.disk.rename(moved)  # QEMU keeps it open; the path is gone
    try:
        with pytest.raises(FerryError, match=r"disk hda: its image .* does not exist on "
                                             r"host alpha"):
            client.migrate(guest.name, "alpha", "beta", live=True, copy_storage_all=True,
                           xmlin=dest_xml(guest, tmp_path / "d.qcow2")).wait(timeout=60)
    finally:
        moved.rename(guest.disk)
    source_untouched(client, guest, tmp_path / "d.qcow2")


def test_a_backing_file_missing_on_the_dest_for_inc_is_refused_and_nothing_is_made(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path,
        log_image: Path) -> None:
    base = tmp_path / "base.qcow2"
    shutil.copyfile(log_image, base)
    top = tmp_path / "top-template.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    g = make_guest(image=top, disk_format="qcow2")
    boot(client, g)
    g.wait_counter_above(3, timeout=60)
    dest_dir = tmp_path / "dest"  # no base.qcow2 there
    dest_dir.mkdir()
    with pytest.raises(FerryError, match=r"backing file .*dest/base.qcow2 of disk hda does "
                                         r"not exist on host beta"):
        client.migrate(g.name, "alpha", "beta", live=True, copy_storage_inc=True,
                       xmlin=dest_xml(g, dest_dir / "top.qcow2")).wait(timeout=60)
    assert list(dest_dir.iterdir()) == []
    source_untouched(client, g, dest_dir / "top.qcow2")


def test_a_cookie_naming_a_disk_the_guest_lacks_is_refused_by_prepare(
        client: Client, guest: Guest, tmp_path: Path) -> None:
    from celery import chain

    params = {"domain": guest.name, "source": "alpha", "dest": "beta", "flags": 1 | 64,
              "job_id": f"j-nbd-{guest.name}"}
    cookie = (f"<qemu-migration><name>{guest.name}</name><uuid>{guest.uuid}</uuid>"
              "<hostname>alpha</hostname><hostuuid>8b3f4dc4-6a8e-5f9b-94a5-4c35babd8d95"
              "</hostuuid><feature name='nbd'/><nbd><disk target='vdz' capacity='1048576'/>"
              "</nbd></qemu-migration>")
    dest_disk = tmp_path / "d.qcow2"
    state = {"params": params, "xml": dest_xml(guest, dest_disk), "cookie": cookie}
    result = chain(client.app.signature("ferry.prepare3", args=(state,), queue="host.beta"),
                   client.app.signature("ferry.finish3", queue="host.beta")).apply_async()
    try:
        out = result.get(timeout=30)
    finally:
        result.forget()
    assert "unable to find disk target 'vdz'" in out["error"]["text"]
    assert len(qemu_pids_of(guest.uuid)) == 1 and not dest_disk.exists()


def test_a_dest_image_that_is_the_sources_own_open_file_is_refused(
        client: Client, guest: Guest) -> None:
    """Both hosts on one machine without --xml: the dest would mirror the disk onto
    itself; the file's lock says another process holds it."""
    with pytest.raises(FerryError, match=r"is in use by another process on host beta"):
        client.migrate(guest.name, "alpha", "beta", live=True,
                       copy_storage_all=True).wait(timeout=60)
    info = client.call("alpha", "dominfo", domain=guest.name)
    assert info["state"] == "running" and guest.disk.exists()
    assert qemu_pids_of(guest.uuid) == [info["pid"]]
    assert no_copy_left_in(client, "alpha", guest.name)


def test_a_raw_dest_image_that_is_the_sources_own_open_file_is_refused_by_name(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    """A raw image in use passes `qemu-img info` (it takes no write lock): the dest's
    QEMU then opens it read-only, which Prepare must name, not QEMU's bare words."""
    g = make_guest()  # raw
    boot(client, g)
    with pytest.raises(FerryError, match=rf"image {g.disk} of disk hda is in use by another "
                                         r"process on host beta \(QEMU could open it only"):
        client.migrate(g.name, "alpha", "beta", live=True,
                       copy_storage_all=True).wait(timeout=60)
    info = client.call("alpha", "dominfo", domain=g.name)
    assert info["state"] == "running" and g.disk.exists()
    assert qemu_pids_of(g.uuid) == [info["pid"]]
    assert all(d["name"] != g.name for d in client.call("beta", "list", all=True))


def test_a_taken_nbd_port_is_a_clear_error_and_nothing_is_left(
        client: Client, guest: Guest, tmp_path: Path, stack: Stack) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FerryError, match=f"the NBD port {port} on 127.0.0.1 is in use "
                                             "on host beta"):
            client.migrate(guest.name, "alpha", "beta", live=True, copy_storage_all=True,
                           disks_port=port, xmlin=dest_xml(guest, tmp_path / "d.qcow2")
                           ).wait(timeout=60)
    source_untouched(client, guest, tmp_path / "d.qcow2")
    no_port_left(stack)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_dest_without_room_for_the_image_refuses_before_creating_it(
        client: Client, guest: Guest, small_fs: Path) -> None:
    with pytest.raises(FerryError, match=r"no room on host beta for disk\(s\) hda .* the "
                                         r"copy needs .* MiB, .* MiB free"):
        client.migrate(guest.name, "alpha", "beta", live=True, copy_storage_all=True,
                       xmlin=dest_xml(guest, small_fs / "d.qcow2")).wait(timeout=60)
    assert list(small_fs.iterdir()) == []
    source_untouched(client, guest, small_fs / "d.qcow2")


def test_a_dest_image_that_fills_its_disk_mid_copy_fails_the_copy_and_is_kept(
        client: Client, guest: Guest, small_fs: Path) -> None:
    existing = small_fs / "d.qcow2"  # there before: used as it is, never removed
    qemu_img("create", "-q", "-f", "qcow2", str(existing), str(64 << 20))
    # QEMU's NBD client reports the dest's ENOSPC as such or, depending on when the write
    # that failed was in flight, as a plain write error.
    with pytest.raises(FerryError, match=r"copy of disk hda to the dest failed: (No space "
                                         r"left on device|write error)"):
        client.migrate(guest.name, "alpha", "beta", live=True, copy_storage_all=True,
                       xmlin=dest_xml(guest, existing)).wait(timeout=120)
    assert existing.exists()
    existing.unlink()
    source_untouched(client, guest, existing)


# -- faults while the disks are copied ----------------------------------------------------


def slow_copy(client: Client, guest: Guest, dest_disk: Path, src: str = "alpha") -> object:
    """A copy at 1 MiB/s (24 MiB of data: long enough to hit), once it is under way."""
    job = client.migrate(guest.name, src, "beta", live=True, copy_storage_all=True,
                         bandwidth_mib_s=1, xmlin=dest_xml(guest, dest_disk))
    wait_for(lambda: mirroring(client, src, guest.name), 60, "the disk copy to run")
    return job


def test_abort_while_the_disks_are_copied_leaves_the_source_untouched(
        client: Client, guest: Guest, tmp_path: Path, stack: Stack) -> None:
    dest_disk = tmp_path / "d.qcow2"
    job = slow_copy(client, guest, dest_disk)
    assert dest_disk.exists()
    reply = job.abort()  # type: ignore[attr-defined]
    assert reply["aborted"] is True and reply["status"] == "cancelled"
    with pytest.raises(FerryError, match="operation aborted: migration job canceled by "
                                         "client"):
        job.wait(timeout=60)  # type: ignore[attr-defined]
    # an abort is an interruption a retry continues (the issue): the partial image is
    # kept, recorded for this guest, and goes when its keep time ends
    [rec] = [r for r in kept_records(stack, "beta") if r["path"] == str(dest_disk)]
    assert (rec["attempt"], rec["uuid"], rec["source"]) == (job.id, guest.uuid, "alpha")  # type: ignore[attr-defined]
    expire(stack, "beta", dest_disk)
    wait_for(lambda: not dest_disk.exists(), 90, "the sweeper to remove the partial image")
    source_untouched(client, guest, dest_disk)
    no_port_left(stack)


def test_setspeed_applies_to_the_disk_copy(client: Client, guest: Guest,
                                           tmp_path: Path) -> None:
    dest_disk = tmp_path / "d.qcow2"
    job = slow_copy(client, guest, dest_disk)
    [mirror] = qmp(client, "alpha", guest.name, "query-block-jobs")
    assert mirror["speed"] == 1 << 20
    job.set_speed(3)  # type: ignore[attr-defined]
    [mirror] = qmp(client, "alpha", guest.name, "query-block-jobs")
    assert mirror["speed"] == 3 << 20
    job.set_speed(0)  # type: ignore[attr-defined]
    summary = job.wait(timeout=120)  # type: ignore[attr-defined]
    assert summary["result"] == "completed"
    wait_info(client, "beta", guest.name, lambda i: i["state"] == "running")
    log_complete(client, "beta", guest, dest_disk)


def test_the_dest_qemu_killed_mid_copy_fails_the_copy_and_its_image_goes(
        client: Client, guest: Guest, tmp_path: Path, stack: Stack) -> None:
    dest_disk = tmp_path / "d.qcow2"
    job = slow_copy(client, guest, dest_disk)
    src_pid = client.call("alpha", "dominfo", domain=guest.name)["pid"]
    [dest_pid] = [p for p in qemu_pids_of(guest.uuid) if p != src_pid]
    os.kill(dest_pid, signal.SIGKILL)
    with pytest.raises(FerryError, match=r"copy of disk hda to the dest failed|exited"):
        job.wait(timeout=60)  # type: ignore[attr-defined]
    source_untouched(client, guest, dest_disk)
    no_port_left(stack)


def test_the_dest_worker_killed_mid_copy_lets_the_copy_finish_after_its_restart(
        client: Client, guest: Guest, tmp_path: Path, stack: Stack) -> None:
    dest_disk = tmp_path / "d.qcow2"
    job = slow_copy(client, guest, dest_disk)
    stack.kill_worker("beta", signal.SIGKILL)  # its QEMU (and NBD server) go on
    job.set_speed(0)  # type: ignore[attr-defined]
    stack.start_worker("beta")
    summary = job.wait(timeout=120)  # type: ignore[attr-defined]
    assert summary["result"] == "completed"
    wait_info(client, "beta", guest.name, lambda i: i["state"] == "running")
    assert len(qemu_pids_of(guest.uuid)) == 1
    log_complete(client, "beta", guest, dest_disk)
    no_port_left(stack)


@pytest.fixture
def stalling_host(faulty_host: Callable[..., str], tmp_path: Path) -> tuple[str, Path]:
    """Source host gamma: a 5 s stall timeout, failpoints armed by files."""
    fp = tmp_path / "fp"
    fp.mkdir()
    return faulty_host("", FERRY_MIGRATION_STALL_TIMEOUT_S="5",
                       FERRY_FAILPOINT_DIR=str(fp)), fp


def test_a_dest_that_stops_answering_mid_copy_is_given_up_after_the_stall_timeout(
        client: Client, make_guest: Callable[..., Guest], log_image: Path, tmp_path: Path,
        stalling_host: tuple[str, Path], stack: Stack) -> None:
    src, _ = stalling_host
    g = make_guest(image=log_image, disk_format="qcow2")
    boot(client, g, src)
    g.wait_counter_above(3, timeout=60)
    dest_disk = tmp_path / "d.qcow2"
    job = slow_copy(client, g, dest_disk, src)
    src_pid = client.call(src, "dominfo", domain=g.name)["pid"]
    [dest_pid] = [p for p in qemu_pids_of(g.uuid) if p != src_pid]
    os.kill(dest_pid, signal.SIGSTOP)  # as a network cut that does not reset: silence
    try:
        job.set_speed(0)  # type: ignore[attr-defined]  # a backlog the dest never takes
        # each counter is written to the disk before it is printed: the guest's writes
        # go on while the dest is silent (they wait only for a local snapshot copy)
        g.wait_counter_above(g.counters()[-1] + 10, timeout=30)
        with pytest.raises(FerryError, match="disk copy sent nothing for 5s"):
            job.wait(timeout=90)  # type: ignore[attr-defined]
    finally:
        with contextlib.suppress(ProcessLookupError):  # Finish may have killed it meanwhile
            os.kill(dest_pid, signal.SIGCONT)
    source_untouched(client, g, dest_disk, src=src)
    assert "disk-error" not in g.serial.read_text(errors="replace")


def test_the_source_worker_killed_mid_round_leaves_no_snapshot_and_no_bitmap(
        client: Client, make_guest: Callable[..., Guest], log_image: Path, tmp_path: Path,
        stalling_host: tuple[str, Path], stack: Stack) -> None:
    """The worker dies while a backup round reads its snapshot: after its restart the
    guest's device is back on its disk's node, the fleecing graph and file are gone,
    and so is the disk's bitmap (what the round sent is unknown: a retry copies all)."""
    src, fp = stalling_host
    g = make_guest(image=log_image, disk_format="qcow2")
    boot(client, g, src)
    g.wait_counter_above(3, timeout=60)
    dest_disk = tmp_path / "d.qcow2"
    (fp / "perform3.mirroring").write_text("kill")
    job = client.migrate(g.name, src, "beta", live=True, copy_storage_all=True,
                         bandwidth_mib_s=1, xmlin=dest_xml(g, dest_disk))
    wait_for(lambda: src not in live_hosts(stack), 60, "the source worker to die")
    fleece = stack.workers[src].state_dir / "fleece"
    assert [p.name for p in fleece.iterdir()] == [f"{g.uuid}-hda.img"]  # mid-round
    (fp / "perform3.mirroring").unlink()
    stack.start_worker(src, env=stack.workers[src].env)
    with pytest.raises(FerryError, match="interrupted"):
        job.wait(timeout=120)
    if dest_disk.exists():  # kept for a retry (which will find no bitmap and copy all)
        expire(stack, "beta", dest_disk)
        wait_for(lambda: not dest_disk.exists(), 90, "the sweeper to remove the image")
    source_untouched(client, g, dest_disk, src=src)
    assert not list(fleece.iterdir())
    [entry] = [b for b in qmp(client, src, g.name, "query-block") if b.get("inserted")]
    assert not entry["inserted"]["node-name"].startswith("fleece-")
    assert not entry["inserted"].get("dirty-bitmaps")


def test_abort_at_the_switch_over_cancels_the_mirrors_and_the_source_runs_on(
        client: Client, make_guest: Callable[..., Guest], log_image: Path, tmp_path: Path,
        stalling_host: tuple[str, Path]) -> None:
    src, fp = stalling_host
    g = make_guest(image=log_image, disk_format="qcow2")
    boot(client, g, src)
    g.wait_counter_above(3, timeout=60)
    (fp / "perform3.switchover").write_text("pause")
    dest_disk = tmp_path / "d.qcow2"
    job = client.migrate(g.name, src, "beta", live=True, copy_storage_all=True,
                         xmlin=dest_xml(g, dest_disk))
    wait_for((fp / "perform3.switchover.hit").exists, 60, "the switch-over")
    assert client.call(src, "dominfo", domain=g.name)["state"] == "paused"
    job.abort()
    (fp / "perform3.switchover").unlink()
    with pytest.raises(FerryError, match="abort"):
        job.wait(timeout=60)
    wait_info(client, src, g.name, lambda i: i["state"] == "running")
    assert no_copy_left_in(client, src, g.name)
    source_untouched(client, g, dest_disk, src=src)


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16 MiB qcow2 with 1 MiB of random data (quick to copy) whose guest fills
    128 MiB of its RAM with random bytes (slow to move)."""
    return make_log_image(tmp_path_factory.mktemp("storage-small"), random_mib=1,
                          size_mib=16, ram_random_mib=128)


def test_abort_while_prepare_holds_removes_the_image_the_dest_made(
        client: Client, guest: Guest, tmp_path: Path, stalling_host: tuple[str, Path]
        ) -> None:
    dst, fp = stalling_host  # here the dest, with its failpoints armed by files
    (fp / "prepare3.end").write_text("pause")
    dest_disk = tmp_path / "d.qcow2"
    job = client.migrate(guest.name, "alpha", dst, live=True, copy_storage_all=True,
                         xmlin=dest_xml(guest, dest_disk))
    wait_for((fp / "prepare3.end.hit").exists, 60, "Prepare to hold")
    assert dest_disk.exists()  # made by Prepare, before its end
    reply = job.abort()
    assert reply.get("deferred") is True
    (fp / "prepare3.end").unlink()
    with pytest.raises(FerryError, match="abort"):
        job.wait(timeout=60)
    source_untouched(client, guest, dest_disk, dst=dst)


def test_abort_while_the_ram_moves_after_the_disks_cancels_both(
        client: Client, make_guest: Callable[..., Guest], small_image: Path, tmp_path: Path,
        stack: Stack) -> None:
    g = make_guest(image=small_image, disk_format="qcow2", memory_mib=256,
                   domain_type="qemu")  # TCG fills its RAM fast
    boot(client, g)
    g.wait_counter_above(3, timeout=60)
    wait_for(lambda: "ferry-guest filled" in g.serial.read_text(errors="replace"), 60,
             "the guest to fill its RAM")
    dest_disk = tmp_path / "d.qcow2"
    # 20 MiB/s: the mirror outruns the guest's log writes (two 128 KiB clusters dirtied
    # every 20 ms) and the RAM takes ~10 s after it
    job = client.migrate(g.name, "alpha", "beta", live=True, copy_storage_all=True,
                         bandwidth_mib_s=20, xmlin=dest_xml(g, dest_disk))

    def ram_moving() -> bool:
        info = job.info()
        disk = info.get("disk_total") or 0
        return bool(disk) and (info.get("data_processed") or 0) > disk + (1 << 20)

    wait_for(ram_moving, 90, "the RAM to move after the disks")
    [mirror] = qmp(client, "alpha", g.name, "query-block-jobs")
    assert mirror["ready"] is True  # the disks are in sync while the RAM moves
    job.abort()
    with pytest.raises(FerryError, match=r"abort|cancel"):
        job.wait(timeout=60)
    source_untouched(client, g, dest_disk)
    no_port_left(stack)


@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_log_image(tmp_path_factory.mktemp("storage-tiny"), random_mib=1, size_mib=16)


def test_timeout_pauses_a_guest_whose_writes_outrun_the_disk_copy_and_it_completes(
        client: Client, make_guest: Callable[..., Guest], tiny_image: Path,
        tmp_path: Path) -> None:
    """At 2 MiB/s the mirror never catches up with the guest's log writes (two 128 KiB
    clusters dirtied every 20 ms): --timeout pauses it, as virsh's does, the copy
    converges, and the guest runs on on the dest."""
    g = make_guest(image=tiny_image, disk_format="qcow2")
    boot(client, g)
    g.wait_counter_above(3, timeout=60)
    dest_disk = tmp_path / "d.qcow2"
    watch = JobWatch(client, "alpha", g.name)
    try:
        summary = client.migrate(g.name, "alpha", "beta", live=True, copy_storage_all=True,
                                 bandwidth_mib_s=2, timeout_s=5,
                                 xmlin=dest_xml(g, dest_disk)).wait(timeout=120)
    finally:
        samples = watch.stop()
    assert summary["result"] == "completed"
    assert any((s.get("disk_remaining") or 0) > 0 for s in samples)
    wait_info(client, "beta", g.name, lambda i: i["state"] == "running")
    g.wait_counter_above(g.counters()[-1] + 3, timeout=30)
    log_complete(client, "beta", g, dest_disk)
