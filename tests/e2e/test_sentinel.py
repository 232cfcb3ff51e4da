"""A broker that survives the loss of its machine: Redis Sentinel on real processes.

A stack of its own: a Redis master, one replica and three redis-sentinel
processes (scripts/testbed/sentinel.py, down-after 2 s), two workers whose
failpoints are armed at run time.  Each case holds a migration phase at its
failpoint (tests/e2e/faultcases.py's points), SIGKILLs the master, lets the
sentinels promote the replica, brings the old master back as a replica, lets
the phase go, and checks what must hold whatever the outcome: the guest runs
on exactly one host (never two at once), its leases are held by that host
only, the job's outcome and first error are readable, nothing is left over
(QEMU processes, migration ports, admission slots, lease keys) and a second
migration right after works.

The default run takes a representative slice; FERRY_TEST_SENTINEL_ALL=1 runs
every phase of every mode.  FERRY_SENTINEL_REPORT=<file> appends each case's
outcome and the measured reconnect times as JSON lines (docs/sentinel.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from lxml import etree

from config import broker
from config.settings import load
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.sentinel import SentinelSet, Server
from scripts.testbed.stack import Stack, pid_alive, searchable, wait_for
from tasks.client import Client
from tests.conftest import qemu_pids_of
from tests.e2e.faultcases import DEST, POINTS, SOURCE, At, Mode
from workers.errors import FerryError
from workers.jobsignals import sender as signals
from workers.locks import RedisLocks

SRC, DST = "salpha", "sbeta"
_BASE = int(os.environ.get("FERRY_TEST_PORT_BASE", "30000")) + 600
PORTS = (_BASE, _BASE + 9)  # the workers' migration ports: none may be left listening
ALL = bool(os.environ.get("FERRY_TEST_SENTINEL_ALL"))


@dataclass
class SentinelStack:
    stack: Stack
    set: SentinelSet
    client: Client
    disk_dir: Path
    base_image: Path

    def worker_env(self, host: str) -> dict[str, str]:
        return {"FERRY_FAILPOINT_DIR": str(self.fp_dir(host)),
                "FERRY_MIGRATION_PORTS": f"{PORTS[0]}-{PORTS[1]}",
                # longer than a failover (down-after 2 s + election + promotion)
                "FERRY_BROKER_RETRY_S": "20", "FERRY_REPLICA_WAIT_MS": "3000",
                "FERRY_P2P_TIMEOUT_S": "40", "FERRY_INCOMING_TIMEOUT_S": "40",
                "FERRY_SWEEP_INTERVAL_S": "2", "FERRY_HEARTBEAT_INTERVAL_MS": "500"}

    def fp_dir(self, host: str) -> Path:
        return self.stack.root / host / "failpoints"

    def start_worker(self, host: str) -> None:
        self.fp_dir(host).mkdir(parents=True, exist_ok=True)
        self.stack.start_worker(host, env=self.worker_env(host))

    def master_client(self) -> redis.Redis:
        return self.stack.redis_client(socket_timeout=5)

    def status(self, host: str, name: str) -> tuple[str, int] | None:
        """(state, pid) from the host's status file when its QEMU lives."""
        path = self.stack.root / host / "run" / f"{name}.xml"
        try:
            root = etree.parse(str(path)).getroot()
        except (OSError, etree.XMLSyntaxError):
            return None
        pid = int(root.get("pid", "0"))
        return (root.get("state", ""), pid) if pid and pid_alive(pid) else None

    def fail_over(self) -> tuple[Server, float]:
        """SIGKILL the master, wait for the promotion, bring the old master back as a
        replica in sync; the new master and the seconds until it was promoted."""
        killed_at = time.monotonic()
        old = self.set.kill_master()
        new = self.set.wait_failover(old)
        promoted = time.monotonic() - killed_at
        self.heal(old)
        return new, promoted

    def heal(self, old: Server) -> None:
        """The old master back as a replica in sync, and both workers' heartbeats on
        the new master (a failover may drop the last ones, like any recent write)."""
        self.set.restart_as_replica(old)
        self.set.wait_replicas(1)
        for host in (SRC, DST):
            proc = self.stack.workers[host].proc
            if proc is not None and proc.poll() is None:
                self.stack.wait_alive(host, proc.pid)


@pytest.fixture(scope="module")
def sstack(base_image: Path) -> Iterator[SentinelStack]:
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-s-", dir="/tmp")))
    st = Stack(root=root, log_level="DEBUG")
    try:
        st.start_sentinel()
        assert st.sentinel is not None
        ss = SentinelStack(st, st.sentinel, Client(load(st.env())), root / "disks", base_image)
        ss.disk_dir.mkdir()
        for host in (SRC, DST):
            ss.start_worker(host)
        yield ss
    finally:
        st.stop(kill_guests=True)
        if not os.environ.get("FERRY_TEST_KEEP"):
            shutil.rmtree(root, ignore_errors=True)


def _report(entry: dict[str, Any]) -> None:
    path = os.environ.get("FERRY_SENTINEL_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


class Sampler(threading.Thread):
    """Samples both hosts' status files until stopped: the most copies ever running."""

    def __init__(self, ss: SentinelStack, name: str) -> None:
        super().__init__(daemon=True)
        self.ss, self.name = ss, name
        self.stopped = threading.Event()
        self.most_running, self.samples = 0, 0

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            states = [s[0] if (s := self.ss.status(h, self.name)) else None
                      for h in (SRC, DST)]
            self.samples += 1
            self.most_running = max(self.most_running, states.count("running"))


@dataclass
class Guest:
    name: str
    uuid: str
    disk: Path
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    job_id: str = ""


def _start_guest(ss: SentinelStack, host: str = SRC) -> Guest:
    name, dom_uuid = f"s-{uuidlib.uuid4().hex[:8]}", str(uuidlib.uuid4())
    disk = ss.disk_dir / f"{name}.img"
    shutil.copyfile(ss.base_image, disk)
    xml = guest_xml(name, disk, ss.disk_dir / f"{name}.serial", memory_mib=32,
                    uuid=dom_uuid, domain_type="qemu")
    ss.client.call(host, "define", xml=xml)
    ss.client.call(host, "start", domain=name)
    return Guest(name, dom_uuid, disk)


def _release(ss: SentinelStack, point: tuple[str, str] | None) -> None:
    if point is not None:
        side, name = point
        host = SRC if side == SOURCE else DST
        for suffix in ("", ".hit"):
            with contextlib.suppress(FileNotFoundError):
                (ss.fp_dir(host) / f"{name}{suffix}").unlink()


def _arm(ss: SentinelStack, point: tuple[str, str]) -> Path:
    side, name = point
    host = SRC if side == SOURCE else DST
    (ss.fp_dir(host) / name).write_text("pause")
    return ss.fp_dir(host) / f"{name}.hit"


def _settled(ss: SentinelStack, guest: Guest) -> str | None:
    """The host the guest runs on once nothing moves any more (None: still moving)."""
    if ss.master_client().exists(f"ferry:job:{guest.uuid}"):
        return None
    live = {h: s[0] for h in (SRC, DST) if (s := ss.status(h, guest.name)) is not None}
    if len(qemu_pids_of(guest.uuid)) != len(live) or list(live.values()) != ["running"]:
        return None
    return next(iter(live))


def _speed_up(job: Any) -> bool:
    try:
        job.set_speed(0)
        return True
    except FerryError:  # the job ended, or its owner is not listening again yet
        return bool(job.done())


def _run_case(ss: SentinelStack, mode: Mode, at: At) -> tuple[Guest, str, float]:
    """A migration whose master is killed at `at`; the host the guest ends on."""
    guest = _start_guest(ss)
    point = POINTS[at]
    marker = _arm(ss, point) if point is not None else None
    sampler = Sampler(ss, guest.name)
    sampler.start()
    try:
        speed = {"bandwidth_mib_s": 1} if at == At.COPYING else {}
        job = ss.client.migrate(guest.name, SRC, DST, live=True, p2p=mode != Mode.MANAGED,
                                tunnelled=mode == Mode.TUNNELLED, **speed)
        guest.job_id = job.id
        if marker is not None:
            wait_for(marker.exists, 60, f"{point} to be reached")
        else:
            wait_for(lambda: (job.info().get("data_processed") or 0) > 0, 60,
                     "the copy to run")
        _, promoted = ss.fail_over()
        _release(ss, point)
        if at == At.COPYING:
            wait_for(lambda: _speed_up(job), 60, "the migration to speed up or end")
        try:
            guest.summary = job.wait(timeout=90)
        except FerryError as exc:
            guest.error = str(exc)
        try:
            host = str(wait_for(lambda: _settled(ss, guest), 60, "the case to settle"))
        except TimeoutError:
            states = {h: ss.status(h, guest.name) for h in (SRC, DST)}
            raise AssertionError(f"unsettled: {states}, error {guest.error}\n"
                                 f"{_job_log(ss, guest)}") from None
    finally:
        sampler.stopped.set()
        sampler.join()
        _release(ss, point)
    assert sampler.samples > 2 and sampler.most_running <= 1, "two running copies seen"
    return guest, host, promoted


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def _job_log(ss: SentinelStack, guest: Guest) -> str:
    """Both workers' log lines naming the case's job or guest, in time order."""
    lines = []
    for host in (SRC, DST):
        with contextlib.suppress(OSError):
            text = (ss.stack.root / host / "worker.log").read_text(errors="replace")
            lines += [line[:300] for line in text.splitlines() if LOG_LINE.match(line) and
                      ((guest.job_id and guest.job_id in line) or guest.name in line or
                       "WARNING" in line or "ERROR" in line)]
    return "\n".join(sorted(lines)[-80:])


def _lease_holders(ss: SentinelStack, guest: Guest) -> dict[str, str | None]:
    """Every lease key of the guest (domain and disk) and the host holding it."""
    r = ss.master_client()
    out: dict[str, str | None] = {}
    for key in (f"ferry:lease:domain:{guest.uuid}",
                f"ferry:lease:disk:{os.path.realpath(guest.disk)}"):
        raw = r.get(key)
        out[key] = None if raw is None else str(json.loads(raw)["host"])
    return out


def _listening(ports: range) -> list[int]:
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                port = int(cols[1].rsplit(":", 1)[1], 16)
                if cols[3] == "0A" and port in ports:
                    found.append(port)
    return found


def _holders(ports: range) -> list[str]:
    """Who listens on `ports`: pid and the start of its command line (for the message)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) in ports:
                    inodes.add(f"socket:[{cols[9]}]")
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if inodes & _fd_targets(pid):
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                found.append(f"{pid}: {cmd[:160].decode(errors='replace')}")
    return found


def _fd_targets(pid: str) -> set[str]:
    targets = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


def _check_after(ss: SentinelStack, guest: Guest, host: str) -> None:
    """What must hold after any case: one copy, its leases, the outcome, no leftovers,
    and a second migration that works."""
    assert len(qemu_pids_of(guest.uuid)) == 1, "a leftover QEMU"
    # A discarded incoming QEMU may still be on its way out on a loaded machine.
    ports = range(PORTS[0], PORTS[1] + 1)
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not _listening(ports), 15, "the migration ports to close")
    assert not _listening(ports), f"a migration port left listening: {_holders(ports)}"
    holders = _lease_holders(ss, guest)
    assert set(holders.values()) == {host}, f"leases not held by {host} alone: {holders}"
    r = ss.master_client()
    stray = [k.decode() for k in r.scan_iter("ferry:lease:*")
             if guest.uuid.encode() in k or str(guest.disk).encode() in k]
    assert sorted(stray) == sorted(holders), f"stray lease keys: {stray}"
    slots = [k.decode() for k in r.scan_iter("ferry:slots:*")
             if guest.job_id and guest.job_id.encode() in r.lrange(k, 0, -1)]
    assert not slots, f"admission slots left: {slots}"
    done = ss.client.call(SRC, "domjobinfo", domain=guest.name, completed=True)
    assert done.get("id") == guest.job_id, f"the job's outcome is not readable: {done}"
    if guest.error is None:
        assert host == DST and guest.summary["result"] == "completed"
    else:
        assert done["type"] == "failed" and done["error"], done
        assert done["error"] in guest.error or guest.error in done["error"], \
            (done["error"], guest.error)
    if host == SRC:
        assert guest.error is not None, "the guest stayed on the source without an error"
    other = DST if host == SRC else SRC
    again = ss.client.migrate(guest.name, host, other, live=True).wait(timeout=90)
    assert again["result"] == "completed"
    assert set(_lease_holders(ss, guest).values()) == {other}


def _cleanup(ss: SentinelStack, guest: Guest) -> None:
    for host in (SRC, DST):
        proc = ss.stack.workers[host].proc
        if proc is None or proc.poll() is not None:
            ss.start_worker(host)
    for host in (SRC, DST):
        for task in ("destroy", "undefine"):
            with contextlib.suppress(Exception):
                ss.client.call(host, task, domain=guest.name, timeout=30)
    wait_for(lambda: not qemu_pids_of(guest.uuid), 20, "the case's QEMUs to go")


def _worker_pids(ss: SentinelStack) -> dict[str, int]:
    return {h: p.pid for h in (SRC, DST)
            if (p := ss.stack.workers[h].proc) is not None and p.poll() is None}


DEFAULT = {(Mode.MANAGED, At.PREPARE), (Mode.MANAGED, At.COPYING),
           (Mode.MANAGED, At.FINISH), (Mode.P2P, At.SWITCHED), (Mode.TUNNELLED, At.COPYING)}
CASES = [pytest.param(mode, at, id=f"{mode.name.lower()}-{at.name.lower()}",
                      marks=() if (mode, at) in DEFAULT or ALL else pytest.mark.skip(
                          reason="FERRY_TEST_SENTINEL_ALL=1 runs every phase"))
         for mode in Mode for at in At]


@pytest.mark.parametrize("mode, at", CASES)
def test_the_master_killed_during_a_phase_leaves_one_running_copy(
        sstack: SentinelStack, mode: Mode, at: At) -> None:
    workers = _worker_pids(sstack)
    guest = Guest("", "", Path())
    try:
        guest, host, promoted = _run_case(sstack, mode, at)
        _report({"case": f"{mode.value} / {at.value}", "outcome": "D" if host == DST else "S",
                 "error": guest.error, "promoted_s": round(promoted, 2)})
        assert _worker_pids(sstack) == workers, "a worker died"
        _check_after(sstack, guest, host)
        if mode == Mode.TUNNELLED and host == SRC:  # the stream through the broker broke
            assert guest.error is not None and "failover" in guest.error, guest.error
    finally:
        if guest.name:
            _cleanup(sstack, guest)


def _reply_from_listener(ss: SentinelStack, host: str) -> bool:
    """A signal on the host's own channel gets an answer (an error: it is no domain)."""
    r = ss.master_client()
    reply_to = f"ferry.reply.{uuidlib.uuid4()}"
    make_pubsub: Any = r.pubsub  # unannotated in redis-py
    pubsub = make_pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(reply_to)
        sig = {"id": "probe", "op": "jobinfo", "args": {}, "reply_to": reply_to}
        if not r.publish(f"ferry.host.{host}", json.dumps(sig)):
            return False
        deadline = time.monotonic() + 2
        while (left := deadline - time.monotonic()) > 0:
            msg = pubsub.get_message(timeout=left)
            if msg is not None and msg.get("type") == "message":
                return True
        return False
    except redis.RedisError:
        return False
    finally:
        pubsub.close()


def _first(pred: Any, since: float, timeout: float = 60) -> float:
    """Seconds from `since` until `pred()` is true (polled every 50 ms)."""
    wait_for(pred, timeout, "a client to see the new master", interval=0.05)
    return time.monotonic() - since


def test_an_idle_guest_keeps_running_and_everything_finds_the_new_master(
        sstack: SentinelStack) -> None:
    """Also measures, from the SIGKILL of the master: the sentinels' promotion, a
    client's next command, the worker's next heartbeat, its job signal listener, and a
    task round trip through the worker (the client's publish, the worker's consumer,
    the result backend)."""
    guest = _start_guest(sstack)
    try:
        pid = sstack.client.call(SRC, "dominfo", domain=guest.name)["pid"]
        settings = load(sstack.stack.env())
        probe = broker.connect(settings, socket_timeout=1, socket_connect_timeout=1)
        probe.ping()
        killed_wall, killed = time.time(), time.monotonic()
        old = sstack.set.kill_master()
        times: dict[str, float] = {}
        signalled: list[tuple[str, float]] = []

        def signal_now() -> None:  # a job signal sent while there is no master
            try:
                signals.send_signal(probe, guest.uuid, "jobinfo", timeout_s=2)
                signalled.append(("answered", time.monotonic() - killed))
            except FerryError as exc:
                signalled.append((type(exc).__name__, time.monotonic() - killed))

        sender = threading.Thread(target=signal_now, daemon=True)
        sender.start()

        def promoted() -> bool:
            with contextlib.suppress(LookupError):
                return sstack.set.master() is not old
            return False

        def client_ok() -> bool:
            try:
                return bool(probe.ping())
            except redis.RedisError:
                return False

        times["promoted_s"] = _first(promoted, killed)
        times["client_s"] = _first(client_ok, killed)

        def beat() -> bool:
            try:
                raw = probe.get(f"ferry:host:{SRC}")
            except redis.RedisError:
                return False
            return raw is not None and json.loads(raw)["beat"] > killed_wall

        times["worker_heartbeat_s"] = _first(beat, killed)
        times["worker_listener_s"] = _first(lambda: _reply_from_listener(sstack, SRC), killed)

        def task_ok() -> bool:
            try:
                return bool(sstack.client.call(SRC, "dominfo", domain=guest.name, timeout=5))
            except (FerryError, redis.RedisError):
                return False

        times["worker_task_s"] = _first(task_ok, killed)
        sender.join(timeout=30)
        assert signalled and signalled[0][0] in ("HostUnavailableError", "NoJobOwnerError"), \
            f"a signal during the failover: {signalled}"
        times["signal_error_s"] = signalled[0][1]
        sstack.heal(old)
        _report({"case": "idle", "outcome": "S", **{k: round(v, 2) for k, v in times.items()}})
        print(f"failover and reconnect times: {times}")

        info = sstack.client.call(SRC, "dominfo", domain=guest.name)
        assert (info["state"], info["pid"]) == ("running", pid)
        guest.job_id = ""
        assert set(_lease_holders(sstack, guest).values()) == {SRC}
        again = sstack.client.migrate(guest.name, SRC, DST, live=True).wait(timeout=90)
        assert again["result"] == "completed"
        assert set(_lease_holders(sstack, guest).values()) == {DST}
        assert len(qemu_pids_of(guest.uuid)) == 1
    finally:
        _cleanup(sstack, guest)


def test_a_lease_handed_over_survives_the_master_killed_right_after(
        sstack: SentinelStack) -> None:
    """The master loses its replica for half a second just as the dest takes the
    leases (a write the replica would not get); the dest's acquire waits until the
    replica is back and has it, and only then starts the CPUs.  The master is killed
    the moment Finish has started them: the promoted replica still shows the dest as
    holder."""
    guest = _start_guest(sstack)
    before = _arm(sstack, (DEST, "finish3.before_cont"))
    after = _arm(sstack, (DEST, "finish3.after_cont"))
    try:
        job = sstack.client.migrate(guest.name, SRC, DST, live=True)
        guest.job_id = job.id
        wait_for(before.exists, 60, "Finish to be about to take the leases")
        sstack.set.cut_replica_link(for_s=0.5)
        started = time.monotonic()
        _release(sstack, (DEST, "finish3.before_cont"))
        wait_for(after.exists, 30, "the dest's CPUs to start")
        took = time.monotonic() - started
        old = sstack.set.kill_master()
        sstack.set.wait_failover(old)
        assert set(_lease_holders(sstack, guest).values()) == {DST}, \
            "the promoted replica lost the dest's leases"
        sstack.heal(old)
        _release(sstack, (DEST, "finish3.after_cont"))
        guest.summary = job.wait(timeout=90)
        assert guest.summary["result"] == "completed"
        host = str(wait_for(lambda: _settled(sstack, guest), 60, "the case to settle"))
        assert host == DST
        _report({"case": "lease hand-over, master killed after it", "outcome": "D",
                 "acquire_waited_s": round(took, 2)})
        _check_after(sstack, guest, DST)
    finally:
        _release(sstack, (DEST, "finish3.before_cont"))
        _release(sstack, (DEST, "finish3.after_cont"))
        _cleanup(sstack, guest)


def test_without_the_wait_a_failover_drops_a_lease_and_with_it_keeps_it(
        sstack: SentinelStack, tmp_path: Path) -> None:
    """Why the WAIT: the same lease write, the replica left behind just before it and
    the master killed just after, is lost by the failover when nothing waited for the
    replica, and kept when the write waited (for the replica to come back)."""
    from workers.domain_xml import parse_domain_xml

    settings = load(sstack.stack.env())
    kept: dict[bool, str | None] = {}
    for waits in (False, True):
        client = broker.connect(settings, socket_timeout=5)
        client.replica_wait_ms = 3000 if waits else 0
        locks = RedisLocks(client, ttl_ms=60000)
        name = f"w-{uuidlib.uuid4().hex[:8]}"
        d = parse_domain_xml(guest_xml(name, tmp_path / f"{name}.img",
                                       tmp_path / f"{name}.serial", memory_mib=32,
                                       uuid=str(uuidlib.uuid4())))
        sstack.set.wait_replicas(1)
        sstack.set.cut_replica_link(for_s=0.5 if waits else None)
        started = time.monotonic()
        locks.acquire(d, DST, 4242)
        took = time.monotonic() - started
        old = sstack.set.kill_master()
        sstack.set.resume_replicas()
        sstack.set.wait_failover(old)
        if waits:
            assert took >= 0.4, "the acquire did not wait for the replica"
        holder = locks.holders(d)[f"domain:{d.uuid}"]
        kept[waits] = None if holder is None else str(holder["host"])
        sstack.heal(old)
        client.close()
    assert kept == {False: None, True: DST}


def test_no_replica_to_acknowledge_fails_the_migration_and_the_source_runs_on(
        sstack: SentinelStack) -> None:
    """A master without a replica cannot make a lease or a phase change survive its
    loss: the migration fails at its first guarded write with an error that says so,
    the source keeps running; once a replica is back, the guest moves."""
    guest = _start_guest(sstack)
    master = sstack.set.master()
    replica = next(s for s in sstack.set.servers if s is not master)
    try:
        pid = sstack.client.call(SRC, "dominfo", domain=guest.name)["pid"]
        replica.stop()
        job = sstack.client.migrate(guest.name, SRC, DST, live=True)
        guest.job_id = job.id
        with pytest.raises(FerryError, match="no replica of the broker acknowledged"):
            job.wait(timeout=90)
        host = str(wait_for(lambda: _settled(sstack, guest), 60, "the case to settle"))
        info = sstack.client.call(SRC, "dominfo", domain=guest.name)
        assert (host, info["state"], info["pid"]) == (SRC, "running", pid)
        assert set(_lease_holders(sstack, guest).values()) == {SRC}
    finally:
        if not replica.running():
            sstack.heal(replica)
    try:
        again = sstack.client.migrate(guest.name, SRC, DST, live=True).wait(timeout=90)
        assert again["result"] == "completed"
    finally:
        _cleanup(sstack, guest)


def test_tls_to_the_sentinels_and_the_master_follows_a_failover(tmp_path: Path) -> None:
    """A TLS-only set (servers, replication, sentinels): ferry's clients and Celery's
    broker and backend connect with FERRY_REDIS_CA, verified, and follow a failover;
    a stopped sentinel does not slow a new client down."""
    from config.celery_app import client_app
    from tests.certs import ca_and_server

    ca, server = ca_and_server(tmp_path)
    tls_set = SentinelSet(tmp_path / "set", tls=(server.cert, server.key, ca.cert))
    try:
        tls_set.start()
        settings = load(tls_set.env())
        client = broker.connect(settings, retry=True, socket_timeout=5)
        client.set("ferry:test:tls", "1")
        app = client_app(settings)
        app.backend.client.set("ferry:test:backend", "1")
        with app.connection_for_write() as conn:
            conn.default_channel.client.ping()
        old = tls_set.kill_master()
        tls_set.wait_failover(old)
        assert client.get("ferry:test:tls") == b"1", "the retrying client found the new master"
        assert app.backend.client.get("ferry:test:backend") == b"1"
        tls_set.sentinels[0].stop()  # a sentinel gone with its machine slows nobody down
        started = time.monotonic()
        assert broker.connect(settings, socket_timeout=5).get("ferry:test:tls") == b"1"
        assert time.monotonic() - started < 1.5
        unverified = load({**tls_set.env(), "FERRY_REDIS_CA": str(server.cert)})
        with pytest.raises(redis.ConnectionError):  # a server the CA did not sign: refused
            broker.connect(unverified, socket_timeout=2).ping()
    finally:
        tls_set.stop()
