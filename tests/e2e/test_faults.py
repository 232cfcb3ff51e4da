"""Faults in the middle of a migration: worker restarts and redelivered phases."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scripts.testbed.guestimage import build_image
from scripts.testbed.stack import Stack, wait_for
from tasks.client import Client
from tests.conftest import Guest, qemu_pids_of, wait_info
from workers.errors import FerryError


def _busy(client: Client, make_guest: Callable[..., Guest], image_dir: Path,
          host: str = "alpha") -> Guest:
    image = build_image(image_dir / "busy16tcg.img", dirty_mib=16, rate_mib_s=None)
    guest = make_guest(memory_mib=128, image=image, domain_type="qemu")
    client.call(host, "define", xml=guest.xml)
    client.call(host, "start", domain=guest.name)
    guest.wait_tick()
    return guest


def test_source_worker_killed_while_perform_copies_cancels_and_the_guest_runs_on_the_source(
        stack: Stack, client: Client, make_guest: Callable[..., Guest],
        image_dir: Path) -> None:
    guest = _busy(client, make_guest, image_dir)
    job = client.migrate(guest.name, "alpha", "beta", live=True, bandwidth_mib_s=4)
    wait_for(lambda: (job.info().get("data_processed") or 0) > 0, 30, "the copy to run")
    src_pid = client.call("alpha", "dominfo", domain=guest.name)["pid"]

    stack.kill_worker("alpha", signal.SIGKILL)
    stack.start_worker("alpha")
    with pytest.raises(FerryError) as err:
        job.wait(timeout=60)

    assert "perform3 was interrupted" in str(err.value)
    info = wait_info(client, "alpha", guest.name, lambda i: i["state"] == "running")
    assert info["pid"] == src_pid
    wait_for(lambda: qemu_pids_of(guest.uuid) == [src_pid], 15, "the dest QEMU to go")
    assert client.call("alpha", "domjobinfo", domain=guest.name)["type"] == "none"
    guest.wait_kept_running()


def test_source_worker_killed_after_the_switch_over_finishes_on_the_dest_after_restart(
        stack: Stack, client: Client, make_guest: Callable[..., Guest],
        faulty_host: Callable[..., str], base_image: Path) -> None:
    src = faulty_host("perform3.after_migrate=kill")
    guest = make_guest(memory_mib=64, domain_type="qemu")
    client.call(src, "define", xml=guest.xml)
    client.call(src, "start", domain=guest.name)
    guest.wait_tick()
    job = client.migrate(guest.name, src, "beta", live=True)
    worker = stack.workers[src].proc
    assert worker is not None
    worker.wait(timeout=60)  # the failpoint kills it right after QEMU completed
    assert worker.returncode == -signal.SIGKILL
    # The source is paused and the dest has the guest, not yet running: P until restart.
    assert len(qemu_pids_of(guest.uuid)) == 2

    stack.start_worker(src, env={"FERRY_FAILPOINTS": ""})
    summary = job.wait(timeout=60)

    assert summary["result"] == "completed"
    dest = wait_info(client, "beta", guest.name, lambda i: i["state"] == "running")
    assert dest["reason"] == "migrated"
    wait_for(lambda: qemu_pids_of(guest.uuid) == [dest["pid"]], 15, "the source QEMU to go")
    assert client.call(src, "dominfo", domain=guest.name)["reason"] == "migrated"
    guest.wait_kept_running()


def test_a_redelivered_prepare_starts_no_second_qemu_and_answers_the_same(
        client: Client, make_guest: Callable[..., Guest], image_dir: Path) -> None:
    guest = _busy(client, make_guest, image_dir)
    job = client.migrate(guest.name, "alpha", "beta", live=True, bandwidth_mib_s=4)
    wait_for(lambda: (job.info().get("data_processed") or 0) > 0, 30, "the copy to run")
    begin = client.app.AsyncResult(f"{job.id}.begin3").get(timeout=5)
    first = client.app.AsyncResult(f"{job.id}.prepare3").get(timeout=5)

    again = client.app.send_task("ferry.prepare3", args=(begin,),
                                 queue="host.beta").get(timeout=30)

    assert again["uri"] == first["uri"] and again["cookie"] == first["cookie"]
    assert len(qemu_pids_of(guest.uuid)) == 2, "one source and one dest QEMU"
    job.abort()
    with pytest.raises(FerryError):
        job.wait(timeout=30)


def test_a_redelivered_confirm_after_the_job_ended_kills_nothing(
        stack: Stack, client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(memory_mib=64, domain_type="qemu")
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    job = client.migrate(guest.name, "alpha", "beta", live=True)
    job.wait(timeout=60)
    finish = client.app.AsyncResult(f"{job.id}.finish3").get(timeout=5)
    client.migrate(guest.name, "beta", "alpha", live=True).wait(timeout=60)
    pid = client.call("alpha", "dominfo", domain=guest.name)["pid"]

    client.app.send_task("ferry.confirm3", args=(finish,), queue="host.alpha")
    log = stack.workers["alpha"].state_dir / "worker.log"
    wait_for(lambda: f"job {job.id} ended already" in log.read_text(), 15,
             "the late confirm3 to be ignored")

    info = client.call("alpha", "dominfo", domain=guest.name)
    assert (info["state"], info["pid"]) == ("running", pid)


def test_a_job_record_whose_phases_were_lost_is_ended_by_the_sweeper_and_the_guest_moves(
        stack: Stack, client: Client, make_guest: Callable[..., Guest],
        faulty_host: Callable[..., str]) -> None:
    """A crash left a record naming this host as the source of a job no guest here is
    in: it would refuse every later job of the guest.  The sweeper ends it (after the
    grace, and only when the next pass still finds it so); records of other hosts and
    young ones stay."""
    import time

    host = faulty_host("", FERRY_SWEEP_INTERVAL_S="1")
    guest = make_guest(domain_type="qemu")
    client.call(host, "define", xml=guest.xml)
    client.call(host, "start", domain=guest.name)
    r = stack.redis_client()
    lost_at = time.time() - 3600
    r.hset(f"ferry:job:{guest.uuid}", mapping={
        "id": "j-lost", "kind": "migration", "phase": "begin3", "source": host,
        "dest": "alpha", "flags": "1", "started": str(lost_at), "progress": "{}",
        "error": ""})
    others = {"ferry:job:00000000-0000-4000-8000-000000000001": {"source": "beta",
                                                                "started": lost_at},
              "ferry:job:00000000-0000-4000-8000-000000000002": {"source": host,
                                                                "started": time.time()}}
    for key, rec in others.items():
        r.hset(key, mapping={"id": f"j-{key[-1]}", "kind": "migration", "phase": "begin3",
                             "dest": "alpha", "flags": "1", "progress": "{}", "error": "",
                             **{k: str(v) for k, v in rec.items()}})
    lines = [f"ferry:slots:{host}>alpha:pair", f"ferry:slots:{host}:out",
             "ferry:slots:alpha:in"]
    for key in lines:  # the lost job holds its places in the admission lines
        r.rpush(key, f"j-lost|{lost_at:.0f}")
    try:
        wait_for(lambda: not r.exists(f"ferry:job:{guest.uuid}"), 20,
                 "the sweeper to end the lost job's record")
        assert r.exists("ferry:jobended:j-lost"), "its late phases will run nothing"
        assert [r.lrange(key, 0, -1) for key in lines] == [[], [], []], \
            "the lost job's places in the lines are given back"
        assert all(r.exists(key) for key in others), "another host's or a young record"
        log = (stack.workers[host].state_dir / "worker.log").read_text()
        assert f"sweeper: ended job j-lost of domain {guest.uuid}" in log

        summary = client.migrate(guest.name, host, "alpha", live=True).wait(timeout=120)
        assert summary["result"] == "completed"
        assert client.call("alpha", "dominfo", domain=guest.name)["state"] == "running"
    finally:
        r.delete(*others)


def _completed(client: Client, host: str, name: str) -> dict[str, Any] | None:
    done = client.call(host, "domjobinfo", domain=name, completed=True)
    return done if done.get("type") not in (None, "none") else None


def test_a_job_whose_record_the_broker_lost_is_ended_by_the_sweeper_and_the_guest_moves(
        stack: Stack, client: Client, make_guest: Callable[..., Guest],
        faulty_host: Callable[..., str]) -> None:
    """The other half: the source's guest waits after Begin in a job whose record (and
    phases) the broker lost.  The sweeper ends the job past the grace; the guest, never
    paused by it, runs on and can be migrated again."""
    host = faulty_host("", FERRY_SWEEP_INTERVAL_S="1", FERRY_SWEEP_GRACE_S="3")
    stack.start_worker("delta", env={"FERRY_FAILPOINTS": "prepare3.start=hang"})
    try:
        guest = make_guest(domain_type="qemu")
        client.call(host, "define", xml=guest.xml)
        pid = client.call(host, "start", domain=guest.name)["pid"]
        job = client.migrate(guest.name, host, "delta", live=True)
        wait_for(lambda: client.app.AsyncResult(f"{job.id}.begin3").ready(), 20,
                 "Begin to end (the dest's Prepare then hangs)")
        assert client.call(host, "domjobinfo", domain=guest.name)["phase"] == "begin3"
        r = stack.redis_client()
        r.delete(f"ferry:job:{guest.uuid}")  # what a broker without its data has left

        done = wait_for(lambda: _completed(client, host, guest.name), 30,
                        "the sweeper to end the job (past the grace, two passes)")
        assert done["type"] == "failed" and "gone from the broker" in done["error"]
        info = client.call(host, "dominfo", domain=guest.name)
        assert (info["state"], info["pid"]) == ("running", pid)
        assert r.exists(f"ferry:jobended:{job.id}"), "its late phases will run nothing"
        log = (stack.workers[host].state_dir / "worker.log").read_text()
        assert f"sweeper: ended job {job.id} of {guest.name}" in log

        summary = client.migrate(guest.name, host, "alpha", live=True).wait(timeout=120)
        assert summary["result"] == "completed"
    finally:
        # delta comes back disarmed before it goes, as a restarted host would: what its
        # hung Prepare left is then ferry's to clean up.
        stack.stop_worker("delta")
        stack.start_worker("delta", env={})
        stack.remove_worker("delta")
