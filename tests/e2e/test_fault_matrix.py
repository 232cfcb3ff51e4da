"""The fault matrix: every fault x phase x mode of tests/e2e/faultcases.py on real parts.

A stack of its own (a persistent redis-server that can be restarted, two
workers whose failpoints are armed at run time), reused by every case; each
case starts a fresh small TCG guest and removes it after.

The outcome is judged from outside ferry: which host has a QEMU of the guest
(/proc: the command line names the guest's uuid and the host's state dir),
whether its vCPUs run (the guest's serial counter goes on), which host holds
its leases (read from Redis).  The serial log, which every copy of the guest
appends to, must show one boot counting on by one all through the case: a
rebooted guest or a second running copy breaks it.  ferry's own view is
checked against that: a poller samples both hosts' status files all through
the case (never two running copies), and at the end they must say what /proc
and the serial log say.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives.serialization import Encoding
from lxml import etree

from config.settings import load
from scripts.cli import tls_init
from scripts.testbed.guestimage import Tick, broken_continuity, serial_ticks
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import Stack, searchable, wait_for
from tasks.client import Client
from tests.conftest import Guest, pid_alive, port_base, qemu_pids_of, remove_guest
from tests.e2e.faultcases import SOURCE, At, Case, Fault, Mode, Outcome, Result, cases
from tests.e2e.storagekit import (
    dest_xml,
    expire,
    log_complete,
    make_log_image,
    no_copy_left_in,
)
from workers.errors import FerryError

SRC, DST = "fsrc", "fdst"
# The dest's migration ports, none of which may be left listening: 600 below the stacks'
# (FERRY_TEST_PORT_BASE, so two checkouts can run the matrix at once), below the
# ephemeral range.
PORTS = (port_base() - 600, port_base() - 591)
# What the job's error must say: by fault, or where the words depend on the phase (and
# the mode), by fault and phase (and mode).  ferry's own words, or QEMU's where ferry
# passes QEMU's error on; {name} is the guest's name.
ERRORS: dict[Fault, str] = {
    Fault.SRC_WORKER: r"the source worker restarted (during (begin3|prepare)|while the dest "
                      r"prepared: the migration is cancelled before Perform)|perform3 was "
                      r"interrupted \(worker restart or redelivery\); QEMU's migration was "
                      r"(active|failed): cancelled",
    Fault.DST_WORKER: r"the dest worker restarted during (prepare|finish3)",
    Fault.SRC_QEMU: r"the QEMU of '{name}' exited \(crashed\) before Perform: the guest is "
                    r"lost, nothing to migrate|QEMU of '{name}' exited during migration",
    Fault.ABORT: r"operation aborted: migration job canceled by client",
    Fault.TLS: r"TLS file \S+/fdst/pki/server-key\.pem is missing|dest host fdst (refused "
               r"the client certificate of fsrc|closed the TLS connection|ended the TLS "
               r"session)",
}
ERRORS_AT: dict[tuple[Fault, At, Mode | None], str] = {
    (Fault.DST_QEMU, At.PREPARE, None):
        r"migration failed: Failed to connect to '127\.0\.0\.1:\d+': Connection refused",
    # with return-path the source's return thread may shut the socket first: EBADF
    (Fault.DST_QEMU, At.COPYING, None): r"migration failed: Unable to write to socket: "
                                        r"(Broken pipe|Connection reset by peer|"
                                        r"Bad file descriptor)",
    (Fault.DST_QEMU, At.SWITCHED, None):
        r"no incoming migration \S+ of '{name}' on this host: its incoming QEMU exited or "
        r"was discarded",
    (Fault.DST_QEMU, At.FINISH, None):
        r"the incoming QEMU exited \(crashed\) before the migration completed",
    (Fault.DST_QEMU, At.STARTED, None):
        r"the incoming QEMU exited \(crashed\) after its CPUs started: the source stays "
        r"paused, the guest may have run here",
    (Fault.DST_WORKER, At.COPYING, Mode.TUNNELLED):
        r"the worker of fdst restarted and found the QEMU of its incoming migration gone",
    (Fault.REDIS, At.COPYING, Mode.TUNNELLED): r"the tunnel through the broker broke",
    (Fault.DST_QEMU, At.COPYING, Mode.STORAGE): r"copy of disk .* to the dest failed",
    (Fault.SRC_WORKER, At.COPYING, Mode.STORAGE):  # the disks were copying, the RAM not yet
        r"perform3 was interrupted \(worker restart or redelivery\); QEMU's migration was "
        r"none: cancelled",
    (Fault.SRC_QEMU, At.COPYING, Mode.STORAGE): r"QEMU of '{name}' exited while copying disks",
}
# After the switch-over a failed job may leave the guest on the dest (libvirt: the
# source cannot be resumed once the dest may have run it); its error must say so.
AFTER_SWITCH_OVER = (At.SWITCHED, At.FINISH, At.STARTED, At.CONFIRM)
ON_DEST = rf"(guest|domain) (runs|is running|was started) on (the dest|{DST})"


@dataclass
class FaultStack:
    stack: Stack
    client: Client
    disk_dir: Path
    base_image: Path
    log_image: Path | None = None  # storage rows: a guest logging to a qcow2 disk

    def storage_image(self) -> Path:
        if self.log_image is None:
            self.log_image = make_log_image(self.disk_dir, random_mib=8, size_mib=32)
        return self.log_image

    def worker_env(self, host: str) -> dict[str, str]:
        return {"FERRY_FAILPOINT_DIR": str(self.fp_dir(host)),
                "FERRY_MIGRATION_PORTS": f"{PORTS[0]}-{PORTS[1]}",
                "FERRY_P2P_TIMEOUT_S": "30", "FERRY_INCOMING_TIMEOUT_S": "30",
                "FERRY_SWEEP_INTERVAL_S": "2",
                "FERRY_LEASE_TTL_MS": "5000"}

    def good_pki(self, host: str) -> None:
        """The host's migration TLS files (<state dir>/pki), from the stack's CA."""
        ca = tls_init.ca_in(self.stack.root / "ca")
        directory = self.stack.root / host / "pki"
        shutil.rmtree(directory, ignore_errors=True)
        tls_init.issue_host(ca, directory, host, ["127.0.0.1"])

    def spoil_pki(self, at: At) -> None:
        """What the TLS row needs: at Prepare, the dest's server key gone; in Perform,
        a source whose certificates come from a CA the dest does not trust (but which
        trusts the dest's: only the dest's side of the handshake refuses)."""
        if at == At.PREPARE:
            (self.stack.root / DST / "pki" / "server-key.pem").unlink()
            return
        other = tls_init.ca_in(self.stack.root / "other-ca")
        directory = self.stack.root / SRC / "pki"
        shutil.rmtree(directory)
        tls_init.issue_host(other, directory, SRC, ["127.0.0.1"])
        ours = tls_init.ca_in(self.stack.root / "ca").cert.public_bytes(Encoding.PEM)
        (directory / "ca-cert.pem").write_bytes(ours + other.cert.public_bytes(Encoding.PEM))

    def fp_dir(self, host: str) -> Path:
        return self.stack.root / host / "failpoints"

    def start_worker(self, host: str) -> None:
        self.fp_dir(host).mkdir(parents=True, exist_ok=True)
        self.stack.start_worker(host, env=self.worker_env(host))

    def status(self, host: str, name: str) -> tuple[str, int] | None:
        """(state, pid) from the host's status file when its QEMU lives."""
        path = self.stack.root / host / "run" / f"{name}.xml"
        try:
            root = etree.parse(str(path)).getroot()
        except (OSError, etree.XMLSyntaxError):
            return None
        pid = int(root.get("pid", "0"))
        return (root.get("state", ""), pid) if pid and pid_alive(pid) else None


@pytest.fixture(scope="module")
def fstack(base_image: Path) -> Iterator[FaultStack]:
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-f-", dir="/tmp")))
    st = Stack(root=root, log_level="DEBUG")
    try:
        st.start_redis(persistent=True)
        fs = FaultStack(st, Client(load({"FERRY_BROKER_URL": st.broker_url})), root / "disks",
                        base_image)
        fs.disk_dir.mkdir()
        searchable(fs.disk_dir)  # a confined QEMU reaches its image there
        for host in (SRC, DST):
            fs.start_worker(host)
            fs.good_pki(host)
        yield fs
    finally:
        st.stop(kill_guests=True)
        if not os.environ.get("FERRY_TEST_KEEP"):
            shutil.rmtree(root, ignore_errors=True)


class Sampler(threading.Thread):
    """Samples both hosts' status files until stopped: the most copies ever running."""

    def __init__(self, fs: FaultStack, name: str) -> None:
        super().__init__(daemon=True)
        self.fs, self.name = fs, name
        self.stopped = threading.Event()
        self.most_running, self.samples = 0, 0
        self.seen: list[tuple[str | None, str | None]] = []

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            states = tuple(s[0] if (s := self.fs.status(h, self.name)) else None
                           for h in (SRC, DST))
            self.samples += 1
            self.most_running = max(self.most_running, states.count("running"))
            if not self.seen or self.seen[-1] != states:
                self.seen.append(states)  # type: ignore[arg-type]


@dataclass
class Run:
    case: Case
    name: str
    uuid: str
    xml: str
    serial: Path
    dest_disk: Path | None = None  # storage rows: the dest's own disk file
    reply: Any = None
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    worker_pids: dict[str, int] = field(default_factory=dict)  # before the fault
    job_id: str = ""


def _host(side: str) -> str:
    return SRC if side == SOURCE else DST


def _start_guest(fs: FaultStack, storage: bool = False) -> tuple[str, str, str, Path]:
    """A fresh guest on the source, counting (so its boot id is known before the case)."""
    name, dom_uuid = f"f-{uuidlib.uuid4().hex[:8]}", str(uuidlib.uuid4())
    disk, serial = fs.disk_dir / f"{name}.img", fs.disk_dir / f"{name}.serial"
    shutil.copyfile(fs.storage_image() if storage else fs.base_image, disk)
    xml = guest_xml(name, disk, serial, memory_mib=32, uuid=dom_uuid, domain_type="qemu",
                    disk_format="qcow2" if storage else "raw")
    fs.client.call(SRC, "define", xml=xml)
    fs.client.call(SRC, "start", domain=name)
    wait_for(lambda: _ticks(serial), 30, f"{name} to count")
    return name, dom_uuid, xml, serial


def _ticks(serial: Path) -> list[Tick]:
    try:
        return serial_ticks(serial.read_text(errors="replace"))
    except FileNotFoundError:
        return []


def _hold(fs: FaultStack, case: Case, job: Any) -> None:
    """Wait (an event, never a sleep) until the case's phase is at its point."""
    if case.point is None and case.mode == Mode.STORAGE:  # the disks are being mirrored
        wait_for(lambda: _mirroring(job.info()), 60, "the disk copy to run")
        return
    if case.point is None:  # copying: QEMU has sent data and goes on at 1 MiB/s
        wait_for(lambda: (job.info().get("data_processed") or 0) > 0, 60, "the copy to run")
        return
    side, point = case.point
    marker = fs.fp_dir(_host(side)) / f"{point}.hit"
    wait_for(marker.exists, 60, f"{point} to be reached")


def _mirroring(info: dict[str, Any]) -> bool:
    return bool(info.get("disk_processed")) and (info.get("disk_remaining") or 0) > 0


def _release(fs: FaultStack, case: Case) -> None:
    if case.point is not None:
        side, point = case.point
        for suffix in ("", ".hit"):
            with contextlib.suppress(FileNotFoundError):
                (fs.fp_dir(_host(side)) / f"{point}{suffix}").unlink()


def _kill_worker(fs: FaultStack, host: str, case: Case) -> None:
    fs.stack.kill_worker(host, signal.SIGKILL)
    _release(fs, case)  # the point of a dead worker must not hold its successor
    fs.start_worker(host)


def _kill_qemu(fs: FaultStack, host: str, run: Run) -> None:
    st = fs.status(host, run.name)
    assert st is not None, f"no QEMU of {run.name} on {host} to kill"
    os.kill(st[1], signal.SIGKILL)
    wait_for(lambda: not pid_alive(st[1]), 10, "the QEMU to die")


def _inflict(fs: FaultStack, run: Run, job: Any) -> None:
    case = run.case
    if case.fault in (Fault.SRC_WORKER, Fault.DST_WORKER):
        _kill_worker(fs, SRC if case.fault == Fault.SRC_WORKER else DST, case)
    elif case.fault in (Fault.SRC_QEMU, Fault.DST_QEMU):
        _kill_qemu(fs, SRC if case.fault == Fault.SRC_QEMU else DST, run)
    elif case.fault == Fault.REDIS:
        fs.stack.restart_redis()
    elif case.fault == Fault.ABORT:
        try:
            run.reply = job.abort()
        except FerryError as exc:
            run.reply = {"refused": str(exc)}
    _release(fs, case)
    if case.at == At.COPYING:  # what goes on after the fault need not crawl
        wait_for(lambda: _speed_up(job), 30, "the migration to speed up or end")


def _speed_up(job: Any) -> bool:
    try:
        job.set_speed(0)
        return True
    except FerryError:  # the job ended, or its owner is not listening again yet
        return job.done()


def _qemus(fs: FaultStack, dom_uuid: str) -> dict[str, list[int]]:
    """From /proc: the live QEMUs of the guest by host (the state dir they run in: the
    worker starts QEMU in its run dir; a confined QEMU's command line names none)."""
    found: dict[str, list[int]] = {}
    for pid in qemu_pids_of(dom_uuid):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd") + "/"
        except OSError:
            continue
        hosts = [h for h in (SRC, DST) if cwd.startswith(f"{fs.stack.root / h}/")]
        found.setdefault(hosts[0] if len(hosts) == 1 else f"pid {pid}?", []).append(pid)
    return found


def _counts_on(serial: Path, within: float) -> bool:
    """Whether some copy of the guest runs its vCPUs: a new counter line within `within`
    seconds (it prints one every 100 ms)."""
    last = (_ticks(serial) or [None])[-1]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        ticks = _ticks(serial)
        if ticks and ticks[-1] != last:
            return True
        time.sleep(0.05)
    return False


def _leases(fs: FaultStack, run: Run) -> dict[str, str]:
    """From Redis: resource -> holding host, for every lease that names the guest."""
    held = {}
    for key in fs.client.redis.scan_iter(match="ferry:lease:*", count=1000):
        raw = fs.client.redis.get(key)
        if raw is None:
            continue
        holder = json.loads(raw)
        if holder.get("uuid") == run.uuid:
            name = key.decode() if isinstance(key, bytes) else str(key)
            held[name.removeprefix("ferry:lease:")] = str(holder["host"])
    return held


PAUSED_WINDOW_S = 1.5  # 15 counter periods without a line: the vCPUs do not run


def _outcome(fs: FaultStack, run: Run) -> Outcome | None:
    """The settled outcome as seen from outside ferry, or None while something is still
    moving (the job record is there, two QEMUs live, a dest QEMU does not run yet)."""
    if fs.client.redis.exists(f"ferry:job:{run.uuid}"):
        return None
    qemus = _qemus(fs, run.uuid)
    if not qemus:
        return Outcome.LOST
    if len(qemus) != 1 or len(next(iter(qemus.values()))) != 1:
        return None
    host = next(iter(qemus))
    if _counts_on(run.serial, PAUSED_WINDOW_S):
        return {SRC: Outcome.S, DST: Outcome.D}.get(host)
    return Outcome.P if host == SRC else None


def _run(fs: FaultStack, case: Case) -> tuple[Run, Outcome | str, float, Sampler]:
    storage = case.mode == Mode.STORAGE
    name, dom_uuid, xml, serial = _start_guest(fs, storage)
    run = Run(case, name, dom_uuid, xml, serial, worker_pids=_worker_pids(fs))
    copy: dict[str, Any] = {}
    if storage:
        run.dest_disk = fs.disk_dir / "dst" / f"{name}.img"
        run.dest_disk.parent.mkdir(exist_ok=True)
        copy = {"copy_storage_all": True, "xmlin": dest_xml(_as_guest(fs, run), run.dest_disk)}
    if case.point is not None:
        side, point = case.point
        (fs.fp_dir(_host(side)) / point).write_text("pause")
    tls = case.fault == Fault.TLS
    if tls:
        fs.spoil_pki(case.at)
    sampler = Sampler(fs, name)
    sampler.start()
    try:
        speed = {"bandwidth_mib_s": 1} if case.at == At.COPYING and not tls else {}
        job = fs.client.migrate(name, SRC, DST, live=True,
                                p2p=case.mode in (Mode.P2P, Mode.TUNNELLED),
                                tunnelled=case.mode == Mode.TUNNELLED, tls=tls, **speed,
                                **copy)
        run.job_id = job.id
        started = time.monotonic()
        if not tls:  # a TLS fault is in the certificates already
            _hold(fs, case, job)
            started = time.monotonic()
            _inflict(fs, run, job)
        try:
            run.summary = job.wait(timeout=90)
        except FerryError as exc:
            run.error = str(exc)
        try:
            outcome: Outcome | str = wait_for(lambda: _outcome(fs, run), 30,  # type: ignore[assignment]
                                              "the case to settle")
        except TimeoutError:
            outcome = f"unsettled {sampler.seen[-1] if sampler.seen else ''}"
        settle = time.monotonic() - started
        # A refusal at Prepare ends within a few samples: let the sampler see the end.
        wait_for(lambda: sampler.samples > 2, 5, "the sampler to sample the settled case")
        return run, outcome, settle, sampler
    finally:
        sampler.stopped.set()
        sampler.join()
        _release(fs, case)


def _worker_pids(fs: FaultStack) -> dict[str, int]:
    """The live worker processes by host (a dead one is left out)."""
    procs = {h: fs.stack.workers[h].proc for h in (SRC, DST)}
    return {h: p.pid for h, p in procs.items() if p is not None and p.poll() is None}


def _cleanup(fs: FaultStack, run: Run) -> None:
    """The case's guest gone from both hosts (through ferry); a failure here fails it."""
    if run.case.fault == Fault.TLS:
        for host in (SRC, DST):
            fs.good_pki(host)
    for host in (SRC, DST):
        if fs.stack.workers[host].proc is None or fs.stack.workers[host].proc.poll() is not None:  # type: ignore[union-attr]
            fs.start_worker(host)
    for host in (SRC, DST):
        remove_guest(fs.client, host, run.name)
    wait_for(lambda: not qemu_pids_of(run.uuid), 20, "the case's QEMUs to go")


def _report(result: Result) -> None:
    path = os.environ.get("FERRY_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(asdict(result)) + "\n")


def _listening(ports: range) -> list[str]:
    """Ports of `ports` with a listening TCP socket (TIME_WAIT ones do not count), each
    with the process holding it, so a failure says whose it is."""
    found: dict[str, int] = {}  # socket inode -> port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                port = int(cols[1].rsplit(":", 1)[1], 16)
                if cols[3] == "0A" and port in ports:
                    found[cols[9]] = port
    return [f"{port} ({_socket_owner(inode)})" for inode, port in found.items()]


def _socket_owner(inode: str) -> str:
    link = f"socket:[{inode}]"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == link:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    return f"pid {proc.name}: {cmd[:160]}"
    return "no process"


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")  # a record's first line


def _job_log(fs: FaultStack, run: Run) -> str:
    """Both workers' log lines naming the case's job or guest, in time order."""
    lines = []
    for host in (SRC, DST):
        with contextlib.suppress(OSError):
            text = (fs.stack.root / host / "worker.log").read_text(errors="replace")
            lines += [line[:300] for line in text.splitlines() if LOG_LINE.match(line) and
                      ((run.job_id and run.job_id in line) or run.name in line)]
    return "\n".join(sorted(lines))


def _slice(all_cases: list[Case]) -> list[Any]:
    """`make test` runs every managed case and a third of the others (each mode, fault and
    phase still seen); `make faults` (FERRY_FAULTS_ALL=1) runs them all."""
    every = bool(os.environ.get("FERRY_FAULTS_ALL"))
    out = []
    for i, case in enumerate(all_cases):
        marks = [] if every or case.mode == Mode.MANAGED or i % 3 == 0 else \
            [pytest.mark.skip(reason="in make faults (FERRY_FAULTS_ALL=1)")]
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


@pytest.mark.parametrize("case", _slice(cases()))
def test_fault_leaves_one_copy_and_says_why(fstack: FaultStack, case: Case) -> None:
    run, outcome, settle, sampler = None, "error", 0.0, None
    try:
        run, outcome, settle, sampler = _run(fstack, case)
        actual = outcome.value if isinstance(outcome, Outcome) else outcome
        passed = outcome == case.expected
        _report(Result(case.id, case.fault.value, case.at.value, case.mode.value,
                       case.expected.value, actual, settle, run.error, passed))
        _check(fstack, run, outcome, sampler)
    except (redis.RedisError, TimeoutError, FerryError) as exc:
        if run is None:
            _report(Result(case.id, case.fault.value, case.at.value, case.mode.value,
                           case.expected.value, "harness error", settle, str(exc), False))
        raise
    except AssertionError:
        if run is not None:
            print(_job_log(fstack, run))  # shown with the failure: what each worker did
        raise
    finally:
        if run is not None:
            _cleanup(fstack, run)


def _check(fs: FaultStack, run: Run, outcome: Outcome | str, sampler: Sampler) -> None:
    case = run.case
    killed = {Fault.SRC_WORKER: SRC, Fault.DST_WORKER: DST}.get(case.fault)
    survivors = {h: pid for h, pid in run.worker_pids.items() if h != killed}
    assert {h: _worker_pids(fs).get(h) for h in survivors} == survivors, \
        "a worker that was not killed died (or was restarted)"
    why = broken_continuity(_ticks(run.serial))
    assert why is None, f"the guest's serial log shows more than one guest counting: {why}"
    assert sampler.samples > 2 and sampler.most_running <= 1, \
        f"two running copies seen in the status files: {sampler.seen}"
    assert outcome == case.expected, \
        f"{case.id}: expected {case.expected.value}, got {outcome} (error: {run.error}); " \
        f"states seen {sampler.seen}"
    _check_ferry_agrees(fs, run, outcome)
    running = {Outcome.S: SRC, Outcome.D: DST}.get(outcome)  # type: ignore[arg-type]
    assert not _listening(range(PORTS[0], PORTS[1] + 1)), "a migration port left listening"
    leases = _leases(fs, run)
    assert set(leases.values()) <= ({running} if running else set()), \
        f"leases held by the wrong host (the guest runs on {running}): {leases}"
    if running is not None:
        assert len(leases) == 2, f"the running copy lacks a lease (domain and disk): {leases}"
    _check_error(run, outcome)
    if outcome == Outcome.P:
        info = fs.client.call(SRC, "dominfo", domain=run.name)
        assert (info["state"], info["reason"]) == ("paused", "migration")
        log = fs.stack.root / SRC / "worker.log"
        wait_for(lambda: f"sweeper: {run.name} stays paused" in log.read_text(), 10,
                 "the source's sweeper to report the guest the migration left paused")
    if case.fault == Fault.ABORT and case.at in (At.FINISH, At.STARTED, At.CONFIRM):
        assert "refused" in (run.reply or {}), f"a late abort was not refused: {run.reply}"
    if case.mode == Mode.STORAGE:
        _check_storage(fs, run, outcome, running)


def _check_storage(fs: FaultStack, run: Run, outcome: Outcome | str,
                   running: str | None) -> None:
    """The disk of the host where the guest runs holds every write it made; a dest
    without the guest keeps no image it created but one recorded for a retry, which goes
    when its keep time ends; no block job or node is left in a source QEMU."""
    assert run.dest_disk is not None
    guest = _as_guest(fs, run)
    if outcome == Outcome.D:
        log_complete(fs.client, DST, guest, run.dest_disk)
        return
    if run.dest_disk.exists():  # kept for a retry (a source worker restart, an abort)
        expire(fs.stack, DST, run.dest_disk)  # fails if it was not recorded as kept
        wait_for(lambda: not run.dest_disk.exists(), 30, "the sweeper to remove the image")
    assert not run.dest_disk.exists(), f"the dest kept the image it created: {run.dest_disk}"
    if running == SRC:
        assert no_copy_left_in(fs.client, SRC, run.name), "a mirror left in the source"
        log_complete(fs.client, SRC, guest, fs.disk_dir / f"{run.name}.img")


def _as_guest(fs: FaultStack, run: Run) -> Guest:
    disk = fs.disk_dir / f"{run.name}.img"
    return Guest(run.name, run.uuid, run.xml, disk, run.serial)


def _check_ferry_agrees(fs: FaultStack, run: Run, outcome: Outcome | str) -> None:
    """ferry's status files say what /proc and the serial log say."""
    qemus = _qemus(fs, run.uuid)
    seen = {h: fs.status(h, run.name) for h in (SRC, DST)}
    expected: dict[str, tuple[str, int] | None] = {SRC: None, DST: None}
    for host, pids in qemus.items():
        state = "paused" if outcome == Outcome.P else "running"
        expected[host] = (state, pids[0])
    assert seen == expected, f"ferry's status files say {seen}, /proc and the serial log " \
                             f"{expected}"


def _check_error(run: Run, outcome: Outcome | str) -> None:
    """The job's error (or its success) is the one the fault and the outcome call for."""
    case = run.case
    if case.fault == Fault.DST_QEMU and case.at == At.CONFIRM:
        # Lost after the migration completed: the source went as planned, and the
        # transient guest on the dest went with its QEMU.
        assert run.error is None and run.summary["result"] == "completed"
        return
    if outcome == Outcome.D:
        if run.error is None:  # also when a restarted dest answered
            assert run.summary["result"] == "completed"
            stats = run.summary.get("statistics") or {}
            assert stats.get("time_elapsed"), f"the summary lacks QEMU's statistics: {stats}"
            return
        # libvirt's rule: a job may fail with the guest on the dest only after the
        # switch-over, and its error must then say the guest runs there.
        assert case.at in AFTER_SWITCH_OVER, \
            f"the job failed before the switch-over, yet the guest runs on the dest: {run.error}"
        assert re.search(ON_DEST, run.error), \
            f"the job failed with the guest on the dest, and its error does not say so: " \
            f"{run.error}"
        return
    assert run.error is not None, "the job failed without an error"
    pattern = ERRORS_AT.get((case.fault, case.at, case.mode)) \
        or ERRORS_AT.get((case.fault, case.at, None)) or ERRORS[case.fault]
    assert re.search(pattern.format(name=re.escape(run.name)), run.error), \
        f"the error does not name the fault in its words ({pattern}): {run.error}"
