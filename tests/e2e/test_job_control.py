"""Job control while a migration runs: signals, progress, convergence, abort."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scripts.testbed.guestimage import build_image
from scripts.testbed.stack import Stack, wait_for
from tasks.client import Client
from tasks.migrate_client import MigrationJob
from tests.conftest import CliResult, Guest, qemu_pids_of, wait_info
from workers.errors import FerryError


@pytest.fixture(scope="module")
def busy_image(image_dir: Path) -> Path:
    """A guest that rewrites 16 MiB as fast as it can: it never converges at low speed."""
    return build_image(image_dir / "busy16.img", dirty_mib=16, rate_mib_s=None)


def _busy_migration(client: Client, make_guest: Callable[..., Guest], image: Path,
                    src: str = "alpha", dst: str = "beta",
                    **opts: Any) -> tuple[Guest, MigrationJob]:
    guest = make_guest(memory_mib=128, image=image)
    client.call(src, "define", xml=guest.xml)
    client.call(src, "start", domain=guest.name)
    guest.wait_tick()
    opts.setdefault("bandwidth_mib_s", 16)
    job = client.migrate(guest.name, src, dst, live=True, **opts)
    wait_for(lambda: (job.info().get("data_processed") or 0) > 0, 30,
             "the migration to copy memory")
    return guest, job


def _ends_running_on_dest(client: Client, guest: Guest, job: MigrationJob,
                          dst: str = "beta") -> None:
    summary = job.wait(timeout=60)
    assert summary["result"] == "completed"
    info = client.call(dst, "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("running", "migrated")
    guest.wait_kept_running()  # the boot it started with, counting on by one


def test_a_migration_that_does_not_converge_shows_moving_figures_and_abort_restores_it(
        ferry: Callable[..., CliResult], client: Client, make_guest: Callable[..., Guest],
        busy_image: Path) -> None:
    guest, job = _busy_migration(client, make_guest, busy_image, bandwidth_mib_s=4)
    first = json.loads(ferry("domjobinfo", "-H", "alpha", guest.name, "--json").out)
    wait_for(lambda: (job.info()["data_processed"] or 0) > first["data_processed"], 10,
             "the figures to move")
    info = job.info()
    assert (info["type"], info["operation"], info["phase"]) == \
        ("unbounded", "outgoing_migration", "perform3")
    assert info["data_total"] >= 128 * 1024 * 1024 and info["memory_bps"] > 0
    incoming = json.loads(ferry("domjobinfo", "-H", "beta", guest.name, "--json").out)
    assert incoming["operation"] == "incoming_migration"
    owner = client.signal("alpha", guest.name, "jobinfo")
    assert owner["phase"] == "perform3" and owner["data_processed"] > 0

    res = ferry("domjobabort", "-H", "alpha", guest.name)
    assert res.rc == 0, res.err
    with pytest.raises(FerryError) as err:
        job.wait(timeout=30)

    assert "aborted" in str(err.value) and "perform3" in str(err.value)
    src = wait_info(client, "alpha", guest.name, lambda i: i["state"] == "running")
    assert qemu_pids_of(guest.uuid) == [src["pid"]], "no QEMU left on the dest"
    guest.wait_kept_running()
    done = client.call("alpha", "domjobinfo", domain=guest.name, completed=True)
    assert done["type"] == "failed" and "aborted" in done["error"]


def test_raising_the_speed_completes_the_migration(
        client: Client, make_guest: Callable[..., Guest], busy_image: Path) -> None:
    guest, job = _busy_migration(client, make_guest, busy_image, bandwidth_mib_s=4)
    assert job.get_speed() == 4
    job.set_speed(0)
    assert job.get_speed() == 0
    job.set_max_downtime(300)
    _ends_running_on_dest(client, guest, job)


def test_raising_the_max_downtime_completes_the_migration(
        ferry: Callable[..., CliResult], client: Client, make_guest: Callable[..., Guest],
        busy_image: Path) -> None:
    guest, job = _busy_migration(client, make_guest, busy_image)
    res = ferry("migrate-setmaxdowntime", "-H", "alpha", guest.name, "5000")
    assert res.rc == 0, res.err
    _ends_running_on_dest(client, guest, job)


def test_suspending_the_guest_completes_the_migration_and_it_runs_on_the_dest(
        ferry: Callable[..., CliResult], client: Client, make_guest: Callable[..., Guest],
        busy_image: Path) -> None:
    guest, job = _busy_migration(client, make_guest, busy_image)
    res = ferry("suspend", "-H", "alpha", guest.name)
    assert res.rc == 0, res.err
    _ends_running_on_dest(client, guest, job)


def test_the_timeout_pauses_the_guest_so_the_migration_completes(
        client: Client, make_guest: Callable[..., Guest], busy_image: Path) -> None:
    guest, job = _busy_migration(client, make_guest, busy_image, timeout_s=2)
    _ends_running_on_dest(client, guest, job)


def test_perform_reports_progress_to_the_result_backend(
        client: Client, make_guest: Callable[..., Guest], busy_image: Path) -> None:
    _guest, job = _busy_migration(client, make_guest, busy_image, bandwidth_mib_s=4)
    perform = client.app.AsyncResult(f"{job.id}.perform3")
    wait_for(lambda: perform.state == "PROGRESS", 10, "a PROGRESS state")
    meta = perform.info
    assert meta["memory_total"] > 0 and 0 <= meta["percent"] <= 100
    # the derived figures follow from QEMU's: never behind the copy, time left at this rate
    assert meta["percent"] >= 100 * (1 - meta["memory_remaining"] / meta["memory_total"]) - 0.1
    if meta["memory_bps"]:
        assert meta["eta_s"] == pytest.approx(meta["memory_remaining"] / meta["memory_bps"],
                                              abs=0.01)
    assert isinstance(meta["stalled"], bool)
    job.abort()
    with pytest.raises(FerryError):
        job.wait(timeout=30)


def test_disk_statistics_are_answered_during_a_migration(
        ferry: Callable[..., CliResult], client: Client, make_guest: Callable[..., Guest],
        busy_image: Path) -> None:
    guest, job = _busy_migration(client, make_guest, busy_image, bandwidth_mib_s=4)
    res = ferry("domblkstat", "-H", "alpha", guest.name, "hda", "--json")
    assert res.rc == 0, res.err
    assert json.loads(res.out)["hda"]["rd_req"] > 0
    by_owner = client.signal("alpha", guest.name, "blkstat", device="hda")
    assert by_owner["hda"]["rd_bytes"] > 0
    assert client.signal("alpha", guest.name, "blkinfo", device="hda")["capacity"] > 0
    assert job.info()["phase"] == "perform3"
    job.abort()
    with pytest.raises(FerryError):
        job.wait(timeout=30)


def test_an_abort_sent_during_a_slow_prepare_is_not_lost(
        client: Client, make_guest: Callable[..., Guest],
        faulty_host: Callable[[str], str]) -> None:
    dest = faulty_host("prepare3.start=slow")
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    job = client.migrate(guest.name, "alpha", dest, live=True)
    wait_for(lambda: job.info()["phase"] == "prepare", 10, "Prepare to start")

    reply = job.abort()
    assert reply["aborted"] and reply.get("deferred") is True
    with pytest.raises(FerryError) as err:
        job.wait(timeout=30)

    assert "aborted" in str(err.value)
    info = client.call("alpha", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("running", "booted")
    assert qemu_pids_of(guest.uuid) == [info["pid"]]


def test_an_abort_just_before_qemus_migrate_cancels_the_stream_it_then_starts(
        stack: Stack, client: Client, make_guest: Callable[..., Guest],
        faulty_host: Callable[..., str], busy_image: Path, tmp_path: Path) -> None:
    """Held after Perform's last abort check, right before QEMU's `migrate`: the abort's
    cancel finds no migration in QEMU; the one that starts next must be cancelled too
    (a guest that never converges ran on until the abort's reply came after the client
    had given up)."""
    armed = tmp_path / "failpoints"
    armed.mkdir()
    src = faulty_host("", FERRY_FAILPOINT_DIR=str(armed))
    guest = make_guest(memory_mib=128, image=busy_image)
    client.call(src, "define", xml=guest.xml)
    client.call(src, "start", domain=guest.name)
    point = armed / "perform3.before_qemu_migrate"
    point.write_text("pause")
    job = client.migrate(guest.name, src, "beta", live=True, bandwidth_mib_s=1)
    replies: list[Any] = []
    aborter = threading.Thread(target=lambda: replies.append(_reply_or_error(job)))
    try:
        wait_for((armed / "perform3.before_qemu_migrate.hit").exists, 30,
                 "Perform to reach QEMU's migrate")
        aborter.start()
        r = stack.redis_client()
        wait_for(lambda: r.hget(f"ferry:job:{guest.uuid}", "abort") == b"1", 10,
                 "the source to take the abort")
    finally:
        point.unlink()
    aborter.join(timeout=30)
    assert replies and isinstance(replies[0], dict), f"the abort's reply: {replies}"
    assert replies[0]["aborted"] and replies[0]["status"] in ("cancelled", "failed")
    with pytest.raises(FerryError, match="aborted"):
        job.wait(timeout=30)
    info = client.call(src, "dominfo", domain=guest.name)
    assert info["state"] == "running" and qemu_pids_of(guest.uuid) == [info["pid"]]
    guest.wait_kept_running()


def _reply_or_error(job: MigrationJob) -> Any:
    try:
        return job.abort()
    except FerryError as exc:
        return exc


def test_signals_to_a_domain_without_a_job_fail_at_once(
        ferry: Callable[..., CliResult], client: Client,
        make_guest: Callable[..., Guest]) -> None:
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    t0 = time.monotonic()
    res = ferry("migrate-setspeed", "-H", "alpha", guest.name, "100")
    assert res.rc == 1 and "no job" in res.err
    res = ferry("domjobabort", "-H", "alpha", guest.name)
    assert res.rc == 1 and "no job" in res.err
    assert time.monotonic() - t0 < 10
    with pytest.raises(FerryError, match="unknown job signal"):
        client.signal("alpha", guest.name, "explode")


def test_switching_to_postcopy_completes_a_migration_that_does_not_converge(
        ferry: Callable[..., CliResult], client: Client, make_guest: Callable[..., Guest],
        busy_image: Path, postcopy_hosts: tuple[str, str]) -> None:
    src, dst = postcopy_hosts
    guest, job = _busy_migration(client, make_guest, busy_image, src, dst,
                                 bandwidth_mib_s=4, postcopy=True)
    res = ferry("migrate-postcopy", "-H", src, guest.name)
    assert res.rc == 0, res.err
    _ends_running_on_dest(client, guest, job, dst)
    assert client.call(src, "dominfo", domain=guest.name)["reason"] == "migrated"


def test_postcopy_of_a_confined_qemu_without_userfaultfd_is_refused_at_begin_saying_why(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    from workers.hostcaps import userfaultfd_for_qemu

    if client.settings.qemu_user in ("", "root") or userfaultfd_for_qemu(confined=True):
        pytest.skip("QEMU may use userfaultfd here: post-copy is not refused")
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    with pytest.raises(FerryError, match=r"vm\.unprivileged_userfaultfd=1") as err:
        client.migrate(guest.name, "alpha", "beta", live=True, postcopy=True).wait(30)
    assert err.value.phase == "begin3"
    assert client.call("alpha", "domjobinfo", domain=guest.name)["type"] == "none"
    assert client.call("alpha", "dominfo", domain=guest.name)["state"] == "running"


def test_postcopy_signal_without_the_postcopy_flag_is_refused(
        client: Client, make_guest: Callable[..., Guest], busy_image: Path) -> None:
    _guest, job = _busy_migration(client, make_guest, busy_image, bandwidth_mib_s=4)
    with pytest.raises(FerryError, match="post-copy was not enabled"):
        job.postcopy()
    job.abort()
    with pytest.raises(FerryError):
        job.wait(timeout=30)
