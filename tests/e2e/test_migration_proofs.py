"""Migration features proven by what QEMU and the guest do, not by what ferry reports.

Each test here closes a place where a wrong ferry would still have passed:
an abort that only works while QEMU is not blocked, a suspend signal, a
non-live migration, post-copy and auto-converge that could silently not
happen, and the persistence flags taken one at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from scripts.testbed.guestimage import build_image
from scripts.testbed.stack import Stack, pid_alive, wait_for
from tasks.client import Client
from tests.conftest import Guest, qemu_pids_of, wait_info
from workers.errors import FerryError

#: x86_64 syscalls a thread blocked writing to a socket sits in
WRITE_SYSCALLS = {1: "write", 20: "writev", 44: "sendto", 46: "sendmsg",
                  7: "poll", 271: "ppoll"}  # QEMU's channel waits to write in poll


@pytest.fixture(scope="module")
def busy_tcg_image(image_dir: Path) -> Path:
    """Rewrites 16 MiB as fast as it can (TCG: fast here, see docs/limits.md)."""
    return build_image(image_dir / "busy16tcg.img", dirty_mib=16, rate_mib_s=None)


def _started(client: Client, make_guest: Callable[..., Guest], host: str = "alpha",
             **kw: Any) -> Guest:
    guest = make_guest(**kw)
    client.call(host, "define", xml=guest.xml)
    client.call(host, "start", domain=guest.name)
    guest.wait_counter_above(0)
    return guest


def _threads(pid: int, name: str) -> list[Path]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if (task / "comm").read_text().strip() == name:
                out.append(task)
    return out


def _thread_syscalls(pid: int, name: str) -> list[str]:
    """What each thread `name` of `pid` does now, for a failure message."""
    out = []
    for task in _threads(pid, name):
        with contextlib.suppress(OSError, IndexError):
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            out.append(f"{task.name}: {state} {(task / 'syscall').read_text().strip()[:60]}")
    return out


def _writer_state(pid: int) -> tuple[str, int] | None:
    """(syscall, bytes written so far) of QEMU's migration thread while it sleeps in a
    socket write; None while it runs or sleeps in anything else."""
    for task in _threads(pid, "live_migration"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            nr = int((task / "syscall").read_text().split()[0])
            io = dict(line.split(": ") for line in (task / "io").read_text().splitlines())
            if state == "S" and nr in WRITE_SYSCALLS:
                return WRITE_SYSCALLS[nr], int(io["wchar"])
    return None


def _stuck_writing(pid: int, for_s: float = 1.0) -> str | None:
    """The write QEMU's migration thread is stuck in: the same sleep, not one byte more,
    for `for_s` seconds of samples."""
    first = _writer_state(pid)
    if first is None:
        return None
    until = time.monotonic() + for_s
    while time.monotonic() < until:
        time.sleep(0.05)
        if _writer_state(pid) != first:
            return None
    return first[0]


@contextlib.contextmanager
def _stopped(pid: int) -> Iterator[None]:
    """The process frozen (SIGSTOP) for the block, let go after it, also on failure."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_abort_lands_while_qemu_is_blocked_on_a_full_tunnel(
        stack: Stack, client: Client, make_guest: Callable[..., Guest],
        image_dir: Path) -> None:
    """The incoming QEMU stops reading, then the source QEMU enters its stop-and-copy: the
    dest's socket, the tunnel's window and the source's socket fill, and QEMU's migration
    thread blocks in its write holding QEMU's big lock, so the monitor cannot even take
    `migrate_cancel`.  The abort must still land at once: the tunnel's ends close before
    QEMU's migration is cancelled (the write fails, the lock is let go)."""
    # 64 MiB that do not compress: more than every buffer on the way holds (zero pages
    # cost QEMU's stream next to nothing)
    image = build_image(image_dir / "random64.img", random_mib=64, rate_mib_s=0)
    guest = _started(client, make_guest, memory_mib=128, image=image, domain_type="qemu")
    wait_for(lambda: "filled" in guest.serial.read_text(errors="replace"), 60,
             "the guest to fill its memory")
    src_pid = client.call("alpha", "dominfo", domain=guest.name)["pid"]
    job = client.migrate(guest.name, "alpha", "beta", live=True, p2p=True, tunnelled=True,
                         bandwidth_mib_s=1)  # it must not complete before the dest freezes
    wait_for(lambda: (job.info().get("data_processed") or 0) > 0, 30, "the copy to run")
    (dst_pid,) = [p for p in qemu_pids_of(guest.uuid) if p != src_pid]

    with _stopped(dst_pid):
        # Any downtime will do now: QEMU stops the guest and sends all that is left at
        # full speed, into buffers nobody empties.
        job.set_max_downtime(2_000_000)
        try:
            wait_for(lambda: _stuck_writing(src_pid), 60,
                     "the source QEMU to be stuck writing to the full tunnel")
        except TimeoutError as exc:
            try:
                ended: object = job.wait(timeout=1)
            except FerryError as err:
                ended = err
            raise AssertionError(f"{exc}: {_thread_syscalls(src_pid, 'live_migration')}, "
                                 f"{ended}") from None
        frozen = guest.counters()[-1]
        assert _stuck_writing(src_pid) and guest.counters()[-1] == frozen, \
            "the guest should be stopped for the switch-over"  # an idle guest ticks too
        processed = job.info()["data_processed"]
        t0 = time.monotonic()
        reply = job.abort()
        answered = time.monotonic() - t0
        # The dest is still frozen: nothing on its side helped the abort along.
        assert _writer_state(src_pid) is None, "the source QEMU is still blocked"
        status = client.call("alpha", "qemu_monitor_command", domain=guest.name,
                             command='{"execute": "query-migrate"}')["status"]

    assert reply["aborted"] is True and reply["status"] in ("cancelled", "failed"), reply
    assert status in ("cancelled", "failed")
    assert answered < 5, f"the abort took {answered:.1f}s to land"
    assert processed < 128 << 20, "the copy was meant to be stuck part way"
    with pytest.raises(FerryError, match="aborted"):
        job.wait(timeout=30)
    info = wait_info(client, "alpha", guest.name, lambda i: i["state"] == "running")
    assert info["pid"] == src_pid
    wait_for(lambda: not pid_alive(dst_pid), 30, "the incoming QEMU to be killed")
    assert qemu_pids_of(guest.uuid) == [src_pid]
    guest.wait_counter_above(frozen + 2)
    r = redis.Redis.from_url(stack.broker_url)
    wait_for(lambda: not r.keys(f"ferry:tunnel:{job.id}:*"), 30, "the tunnel's keys to go")


def _qmp(client: Client, host: str, name: str, command: str, **arguments: Any) -> Any:
    """QEMU's own answer, asked through the host's monitor (never ferry's view of it)."""
    cmd: dict[str, Any] = {"execute": command}
    if arguments:
        cmd["arguments"] = arguments
    return client.call(host, "qemu_monitor_command", domain=name, command=json.dumps(cmd))


def _frozen_counter(guest: Guest, for_s: float = 1.0) -> int:
    """The guest's last serial counter, once it has not moved for `for_s` (10 ticks/s)."""
    last = guest.counters()[-1]
    until = time.monotonic() + for_s
    while time.monotonic() < until:
        time.sleep(0.1)
        now = guest.counters()[-1]
        if now != last:
            last, until = now, time.monotonic() + for_s
    return last


def test_the_suspend_signal_pauses_the_guest_on_the_source_and_the_migration_finishes(
        client: Client, make_guest: Callable[..., Guest], busy_tcg_image: Path) -> None:
    guest = _started(client, make_guest, memory_mib=64, image=busy_tcg_image,
                     domain_type="qemu")
    job = client.migrate(guest.name, "alpha", "beta", live=True, bandwidth_mib_s=8)
    wait_for(lambda: (job.info().get("memory_iteration") or 0) >= 2, 60,
             "a second pass over memory: the guest dirties faster than the copy")
    assert job.info()["phase"] == "perform3", "it was not meant to converge by itself"
    # without --auto-converge QEMU never throttles (the control for the auto-converge test)
    assert not _qmp(client, "alpha", guest.name, "query-migrate").get("cpu-throttle-percentage")

    reply = job.suspend()

    assert (reply["state"], reply["reason"]) == ("paused", "migration")
    assert _qmp(client, "alpha", guest.name, "query-status")["running"] is False
    frozen = _frozen_counter(guest)
    summary = job.wait(timeout=60)
    assert summary["result"] == "completed"
    dst = client.call("beta", "dominfo", domain=guest.name)
    assert (dst["state"], dst["reason"]) == ("running", "migrated")
    assert client.call("alpha", "dominfo", domain=guest.name)["reason"] == "migrated"
    assert guest.wait_counter_above(frozen) == frozen + 1 or guest.counters()[-1] > frozen
    assert qemu_pids_of(guest.uuid) == [dst["pid"]]


@pytest.mark.parametrize("live", [False, True], ids=["non-live", "live"])
def test_a_non_live_migration_pauses_the_guest_before_the_stream_starts(
        live: bool, stack: Stack, client: Client, make_guest: Callable[..., Guest],
        faulty_host: Callable[..., str], tmp_path: Path) -> None:
    """Held right before QEMU's `migrate` (a failpoint), QEMU itself says whether the
    guest runs and that no migration has started; the live run shows the probe can tell."""
    armed = tmp_path / "failpoints"
    armed.mkdir()
    src = faulty_host("", FERRY_FAILPOINT_DIR=str(armed))
    guest = _started(client, make_guest, src)
    (armed / "perform3.before_migrate").write_text("pause")
    job = client.migrate(guest.name, src, "beta", live=live)
    try:
        wait_for((armed / "perform3.before_migrate.hit").exists, 30,
                 "Perform to reach QEMU's migrate")
        status = _qmp(client, src, guest.name, "query-status")
        migration = _qmp(client, src, guest.name, "query-migrate")
        counter = _frozen_counter(guest) if not live else None
        held = client.call(src, "dominfo", domain=guest.name)
    finally:
        (armed / "perform3.before_migrate").unlink()
    summary = job.wait(timeout=60)

    assert migration.get("status", "none") == "none", "the stream had already started"
    assert status["running"] is live
    if not live:
        assert (status["status"], held["state"], held["reason"]) == \
            ("paused", "paused", "migration")
        assert counter is not None and guest.wait_counter_above(counter) > counter
    assert summary["result"] == "completed"
    dst = client.call("beta", "dominfo", domain=guest.name)
    assert (dst["state"], dst["reason"]) == ("running", "migrated")  # its prior run state


def test_post_copy_switches_over_and_the_dest_asks_for_pages(
        client: Client, make_guest: Callable[..., Guest], busy_tcg_image: Path,
        postcopy_hosts: tuple[str, str]) -> None:
    src, dst = postcopy_hosts  # hosts whose QEMU may use userfaultfd
    guest = _started(client, make_guest, src, memory_mib=64, image=busy_tcg_image,
                     domain_type="qemu")
    job = client.migrate(guest.name, src, dst, live=True, postcopy=True,
                         bandwidth_mib_s=8)
    wait_for(lambda: (job.info().get("memory_iteration") or 0) >= 2, 60,
             "pre-copy not converging")
    # Post-copy's background copy slowed down, so the dest runs on missing pages a while.
    _qmp(client, src, guest.name, "migrate-set-parameters",
         **{"max-postcopy-bandwidth": 2 << 20})

    job.postcopy()

    wait_for(lambda: _qmp(client, src, guest.name, "query-migrate")["status"]
             == "postcopy-active", 30, "QEMU to say postcopy-active")
    assert client.call(src, "dominfo", domain=guest.name)["reason"] == "postcopy"

    def asked() -> int:  # QEMU's count of pages the running dest asked the source for
        info = _qmp(client, src, guest.name, "query-migrate")
        assert info["status"] == "postcopy-active", f"post-copy ended too soon: {info}"
        return int(info["ram"]["postcopy-requests"])

    wait_for(asked, 30, "the dest to run the guest and ask for pages it lacks")
    assert _qmp(client, dst, guest.name, "query-status")["running"] is True
    _qmp(client, src, guest.name, "migrate-set-parameters",
         **{"max-postcopy-bandwidth": 0})
    summary = job.wait(timeout=60)
    assert summary["result"] == "completed"
    assert summary["statistics"]["memory_postcopy_requests"] > 0
    assert client.call(src, "dominfo", domain=guest.name)["reason"] == "migrated"
    arrived = client.call(dst, "dominfo", domain=guest.name)
    assert (arrived["state"], arrived["reason"]) == ("running", "migrated")
    guest.wait_counter_above(guest.counters()[-1] + 2)


def test_auto_converge_makes_qemu_throttle_the_guest(
        client: Client, make_guest: Callable[..., Guest], busy_tcg_image: Path) -> None:
    guest = _started(client, make_guest, memory_mib=64, image=busy_tcg_image,
                     domain_type="qemu")
    job = client.migrate(guest.name, "alpha", "beta", live=True, auto_converge=True,
                         bandwidth_mib_s=16)

    def throttle() -> int:
        return int(_qmp(client, "alpha", guest.name, "query-migrate")
                   .get("cpu-throttle-percentage") or 0)

    first = wait_for(throttle, 60, "QEMU to throttle the guest's CPU")
    assert isinstance(first, int) and first >= 20  # QEMU's cpu-throttle-initial
    job.set_speed(0)
    summary = job.wait(timeout=60)
    assert summary["result"] == "completed"
    assert client.call("beta", "dominfo", domain=guest.name)["state"] == "running"


def test_persist_dest_alone_defines_the_dest_and_keeps_the_source_definition(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = _started(client, make_guest)
    client.migrate(guest.name, "alpha", "beta", live=True, persistent=True).wait(timeout=60)

    src = client.call("alpha", "dominfo", domain=guest.name)
    assert (src["state"], src["reason"], src["persistent"]) == ("shutoff", "migrated", True)
    assert client.call("beta", "dominfo", domain=guest.name)["persistent"] is True
    client.call("beta", "destroy", domain=guest.name)
    left = client.call("beta", "dominfo", domain=guest.name)
    assert (left["state"], left["persistent"]) == ("shutoff", True)
    assert guest.name in client.call("beta", "dumpxml", domain=guest.name)


def test_undefine_source_alone_leaves_a_transient_guest_on_the_dest_only(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = _started(client, make_guest)
    client.migrate(guest.name, "alpha", "beta", live=True, undefinesource=True).wait(timeout=60)

    assert all(d["name"] != guest.name for d in client.call("alpha", "list", all=True))
    dst = client.call("beta", "dominfo", domain=guest.name)
    assert (dst["state"], dst["persistent"]) == ("running", False)
    client.call("beta", "destroy", domain=guest.name)
    for host in ("alpha", "beta"):  # libvirt's warning: the guest is gone everywhere now
        with pytest.raises(FerryError, match=r"not found|no domain"):
            client.call(host, "dominfo", domain=guest.name)


def _restarted(stack: Stack, host: str) -> None:
    stack.kill_worker(host, signal.SIGKILL)
    stack.start_worker(host)


def test_a_restarted_worker_keeps_a_guest_paused_by_the_user(
        stack: Stack, client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = _started(client, make_guest)
    pid = client.call("alpha", "suspend", domain=guest.name)["pid"]
    frozen = _frozen_counter(guest)

    _restarted(stack, "alpha")

    info = client.call("alpha", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"], info["pid"]) == ("paused", "user", pid)
    assert _qmp(client, "alpha", guest.name, "query-status")["running"] is False
    assert guest.counters()[-1] == frozen
    client.call("alpha", "resume", domain=guest.name)
    assert guest.wait_counter_above(frozen) > frozen


def test_a_restarted_worker_keeps_a_migrated_guest_running_as_migrated(
        stack: Stack, client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = _started(client, make_guest)
    client.migrate(guest.name, "alpha", "beta", live=True).wait(timeout=60)
    pid = client.call("beta", "dominfo", domain=guest.name)["pid"]

    _restarted(stack, "beta")

    info = client.call("beta", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"], info["pid"]) == ("running", "migrated", pid)
    assert _qmp(client, "beta", guest.name, "query-status")["running"] is True
    guest.wait_counter_above(guest.counters()[-1] + 2)


def test_the_reported_statistics_are_qemus_own_figures(
        client: Client, make_guest: Callable[..., Guest], faulty_host: Callable[..., str],
        tmp_path: Path) -> None:
    """Confirm held (a failpoint): the source QEMU, paused and not yet killed, still
    answers query-migrate; the job's statistics must be its figures."""
    armed = tmp_path / "failpoints"
    armed.mkdir()
    src = faulty_host("", FERRY_FAILPOINT_DIR=str(armed))
    guest = _started(client, make_guest, src)
    (armed / "confirm3.start").write_text("pause")
    job = client.migrate(guest.name, src, "beta", live=True)
    try:
        wait_for((armed / "confirm3.start.hit").exists, 60, "Confirm to be reached")
        qemu = _qmp(client, src, guest.name, "query-migrate")
        # Between the switch-over and Confirm: paused here (QEMU says so), running there.
        held = client.call(src, "dominfo", domain=guest.name)
        src_running = _qmp(client, src, guest.name, "query-status")["running"]
        dst_running = _qmp(client, "beta", guest.name, "query-status")["running"]
    finally:
        (armed / "confirm3.start").unlink()
    stats = job.wait(timeout=60)["statistics"]

    assert (held["state"], held["reason"], src_running, dst_running) == \
        ("paused", "migration", False, True)

    assert qemu["status"] == "completed"
    assert stats["downtime"] == qemu["downtime"]
    assert stats["setup_time"] == qemu["setup-time"]
    assert stats["memory_processed"] == qemu["ram"]["transferred"]
    assert stats["memory_total"] == qemu["ram"]["total"]
    assert stats["memory_iteration"] == qemu["ram"]["dirty-sync-count"]
    dst = client.call("beta", "domjobinfo", domain=guest.name, completed=True)
    assert (dst["downtime_ms"], dst["data_processed"]) == \
        (qemu["downtime"], qemu["ram"]["transferred"])
