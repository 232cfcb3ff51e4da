"""Fixtures that start real parts: redis-server, `ferry worker` processes, QEMU guests.

Everything started here is stopped by pid at the end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from config.settings import load
from scripts.testbed.fleet import Fleet, netns_available
from scripts.testbed.guestimage import Tick, broken_continuity, serial_ticks
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import Stack, pid_alive, qemu_writable, searchable, wait_for
from tasks.client import Client

HOSTS = ("alpha", "beta")

# `make test` runs the suite on two pytest-xdist workers. Modules whose tests share one
# module-wide fixture, or a machine-wide resource (network namespaces and their subnets,
# the fault matrix's port range), run whole on one worker, one group at a time; every
# other test is a unit of its own. (xdist 3.8's `--dist loadgroup` did not keep marked tests
# together under pytest 9 here, so the grouping is done by the scheduler below.)
SERIAL_GROUPS = {
    "test_fault_matrix.py": "faults",
    "test_job_control.py": "job_control",
    "test_fleet.py": "fleet",
    "test_fleet_admission.py": "fleet",
    "test_fleet_cuts.py": "fleet",
    "test_fleet_scale.py": "fleet",
    "test_storage_fleet.py": "fleet",
    "test_guest_network.py": "guest_network",
}


def serial_group(nodeid: str) -> str:
    """The unit of work a test belongs to: its group, or the test alone."""
    return SERIAL_GROUPS.get(nodeid.split("::", 1)[0].rsplit("/", 1)[-1], nodeid)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class SerialGroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return serial_group(nodeid)

    return SerialGroupScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    """This session's temp dirs in a root of its own: guest images live in tmp_path and
    a confined QEMU must reach them (tests make them searchable), but pytest makes
    /tmp/pytest-of-USER private again whenever any session starts, also another
    checkout's running beside this one."""
    if hasattr(config, "workerinput") or config.option.basetemp or \
            os.environ.get("PYTEST_DEBUG_TEMPROOT"):
        return  # xdist workers get their basetemp from the controller
    root = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))  # short: unix socket paths
    root.chmod(0o711)
    os.environ["PYTEST_DEBUG_TEMPROOT"] = str(root)
    config.stash[_TEMPROOT] = root


def pytest_unconfigure(config: pytest.Config) -> None:
    root = config.stash.get(_TEMPROOT, None)
    if root is not None and not os.environ.get("FERRY_TEST_KEEP"):
        shutil.rmtree(root, ignore_errors=True)


_TEMPROOT = pytest.StashKey[Path]()


def _xdist_worker() -> int | None:
    """This process's pytest-xdist worker number (gw3 -> 3), None when run alone."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else None


def port_base() -> int:
    """First migration port of this run's stacks; FERRY_TEST_PORT_BASE moves it so that two
    checkouts can run their suites side by side on one machine."""
    return int(os.environ.get("FERRY_TEST_PORT_BASE", "30000"))


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    # A short root: unix socket paths must fit in 107 bytes.
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-", dir="/tmp")))  # NVRAM dir
    st = Stack(root=root, log_level="DEBUG")
    worker = _xdist_worker()
    if worker is not None:
        # Each xdist worker's stack gets its own migration ports, below the kernel's
        # ephemeral range (32768-60999) that the other worker's redis-servers draw from.
        first = port_base() + 64 * worker
        st.extra_env["FERRY_MIGRATION_PORTS"] = f"{first}-{first + 63}"
    try:
        st.start_redis()
        for name in HOSTS:
            st.start_worker(name, wait=False)
        for name in HOSTS:
            proc = st.workers[name].proc
            assert proc is not None
            st.wait_alive(name, proc.pid)
        yield st
    finally:
        st.stop(kill_guests=True)
        if not os.environ.get("FERRY_TEST_KEEP"):  # keep logs for a post-mortem
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def client(stack: Stack) -> Client:
    return Client(load({"FERRY_BROKER_URL": stack.broker_url}))


@dataclass
class CliResult:
    rc: int
    out: str
    err: str


@pytest.fixture
def ferry(stack: Stack) -> Callable[..., CliResult]:
    """Run the real `ferry` command against the test stack."""
    exe = str(Path(sys.executable).with_name("ferry"))

    def run(*args: str, timeout: float = 60) -> CliResult:
        proc = subprocess.run([exe, *args], env=stack.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture(autouse=True)
def _qemu_reaches_tmp_path(request: pytest.FixtureRequest) -> None:
    """A test's tmp_path (where its guests' images live) reachable by the confined QEMU
    user: pytest makes its temp dirs 0700."""
    if "tmp_path" in request.fixturenames:
        searchable(request.getfixturevalue("tmp_path"))


@pytest.fixture(scope="session")
def image_dir() -> Iterator[Path]:
    path = searchable(Path(tempfile.mkdtemp(prefix="ferry-img-", dir="/tmp")))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def base_image(image_dir: Path) -> Path:
    from scripts.testbed.guestimage import build_image

    return build_image(image_dir / "base.img", dirty_mib=4, rate_mib_s=4)


@dataclass
class Guest:
    name: str
    uuid: str
    xml: str
    disk: Path
    serial: Path

    def counters(self) -> list[int]:
        return [t.count for t in self.ticks()]

    def ticks(self) -> list[Tick]:
        """The counter lines of the serial log so far: (boot id, count) each."""
        try:
            return serial_ticks(self.serial.read_text(errors="replace"))
        except FileNotFoundError:
            return []

    def wait_counter_above(self, value: int, timeout: float = 20) -> int:
        def above() -> int:
            seen = self.counters()
            return seen[-1] if seen and seen[-1] > value else 0

        return int(wait_for(above, timeout, f"{self.name}'s serial counter to pass {value}"))

    def wait_tick(self, timeout: float = 20) -> Tick:
        """The last counter line, once there is one."""
        tick = wait_for(lambda: (self.ticks() or [None])[-1], timeout,
                        f"{self.name} to print a counter line")
        assert isinstance(tick, Tick)
        return tick

    def wait_kept_running(self, since: Tick | None = None, more: int = 2,
                          timeout: float = 20) -> Tick:
        """The guest runs now and never stopped being the guest that printed `since` (the
        log's first line when None): `more` lines past those already printed, and from
        `since` on one boot id and a count going up by one (a reboot, a second copy or a
        lost stretch fails).  Returns the last line."""
        floor = self.wait_tick(timeout).count + more

        def counted_on() -> Tick | None:
            ticks = self.ticks()
            why = broken_continuity(ticks, since)
            assert why is None, f"{self.name} did not keep running: {why}"
            return ticks[-1] if ticks[-1].count >= floor else None

        tick = wait_for(counted_on, timeout, f"{self.name} to count on to {floor}")
        assert isinstance(tick, Tick)
        return tick


@pytest.fixture
def make_guest(tmp_path: Path, base_image: Path, client: Client,
               stack: Stack) -> Iterator[Callable[..., Guest]]:
    """A fresh guest definition (own disk copy and serial log); not yet defined.

    Whatever the test left of its guests on any live host is destroyed and undefined after
    it; a clean-up that fails fails the test.
    """
    made: list[Guest] = []

    def make(memory_mib: int = 64, image: Path | None = None, **kw: object) -> Guest:
        name = f"g-{uuid.uuid4().hex[:8]}"
        disk = tmp_path / f"{name}.img"
        shutil.copyfile(image or base_image, disk)
        serial = tmp_path / f"{name}.serial"
        dom_uuid = str(uuid.uuid4())
        xml = guest_xml(name, disk, serial, memory_mib=memory_mib, uuid=dom_uuid, **kw)  # type: ignore[arg-type]
        guest = Guest(name, dom_uuid, xml, disk, serial)
        made.append(guest)
        return guest

    yield make
    for guest in made:  # every QEMU the test left runs confined
        for pid in qemu_pids_of(guest.uuid):
            assert_confined(pid)
    for guest in made:
        for host in live_hosts(stack):
            remove_guest(client, host, guest.name)


def live_hosts(stack: Stack) -> list[str]:
    """The stack's hosts whose worker process runs."""
    return [name for name, w in stack.workers.items()
            if w.proc is not None and w.proc.poll() is None]


def remove_guest(client: Client, host: str, name: str) -> None:
    """Destroy and undefine domain `name` on `host` where it is; any failure raises."""
    for dom in client.call(host, "list", all=True, timeout=30):
        if dom["name"] != name:
            continue
        if dom["pid"] is not None:  # a QEMU runs it (shutoff and crashed have none)
            client.call(host, "destroy", domain=name, timeout=30)
        if dom["persistent"]:
            client.call(host, "undefine", domain=name, timeout=30)


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a mapping ({} once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def assert_confined(pid: int) -> None:
    """QEMU `pid` runs as an unprivileged user, without capabilities, under its seccomp
    sandbox (FERRY_QEMU_USER, FERRY_QEMU_SANDBOX)."""
    status = proc_status(pid)
    if not status:
        return  # it exited meanwhile
    uids = status["Uid"].split()
    assert "0" not in uids, f"QEMU pid {pid} runs as root: Uid {status['Uid']}"
    assert status["Seccomp"] == "2", f"QEMU pid {pid} has no seccomp filter: {status}"
    assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"] == "1"


def kvm_available() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def qemu_pids_of(uuid: str) -> list[int]:
    """Every live process whose command line names this guest uuid (QEMU's -uuid)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if uuid.encode() in cmdline and pid_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def wait_info(client: Client, host: str, name: str, pred: Callable[[dict[str, object]], bool],
              timeout: float = 20, what: str = "a domain state") -> dict[str, object]:
    def check() -> dict[str, object] | None:
        info = client.call(host, "dominfo", domain=name)
        return info if pred(info) else None

    return dict(wait_for(check, timeout, what))  # type: ignore[call-overload]


def port_free(port: int, address: str = "127.0.0.1") -> bool:
    """Whether a listener may take `port` as QEMU's does (SO_REUSEADDR: connections of an
    ended migration may linger in TIME_WAIT, as they do after the dest QEMU dies when
    the return path lets the source close its end cleanly)."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def pmemsave(client: Client, host: str, name: str, size: int, path: Path,
             start: int = 0) -> str:
    """Guest physical memory [start, size) to `path`; returns its sha256."""
    import hashlib
    import json as _json

    size -= start
    # QEMU opens the file itself, as its (confined) user: in a directory that user owns.
    out = qemu_writable(path.with_name(f"{path.name}.d"), client.settings) / path.name
    client.call(host, "qemu_monitor_command", domain=name, timeout=120, command=_json.dumps(
        {"execute": "pmemsave", "arguments": {"val": start, "size": size,
                                              "filename": str(out)}}))
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    assert out.stat().st_size == size
    shutil.rmtree(out.parent)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def nolock_hosts(stack: Stack) -> Iterator[tuple[str, str]]:
    """Two hosts with lock_manager = none (protocol v2 needs them)."""
    names = ("omega1", "omega2")
    for name in names:
        stack.start_worker(name, env={"FERRY_LOCK_MANAGER": "none"})
    yield names
    for name in names:
        if name in stack.workers:
            stack.remove_worker(name)


@pytest.fixture
def faulty_host(stack: Stack, client: Client) -> Iterator[Callable[[str], str]]:
    """Start host 'gamma' with failpoints armed; it is removed after, its guests first
    destroyed and undefined through it (so no lease or state file outlives them).  A
    test that stopped it for good sees it come back first, failpoints disarmed, as a
    restarted host does: what the stop left is then ferry's to clean up."""
    started: list[str] = []

    def start(failpoints: str, **env: str) -> str:
        stack.start_worker("gamma", env={"FERRY_FAILPOINTS": failpoints, **env})
        started.append("gamma")
        return "gamma"

    yield start
    for name in started:
        if name not in stack.workers:  # the test removed it itself
            continue
        if name not in live_hosts(stack):
            env = {k: v for k, v in stack.workers[name].env.items() if k != "FERRY_FAILPOINTS"}
            stack.start_worker(name, env=env)
        for dom in client.call(name, "list", all=True, timeout=30):
            remove_guest(client, name, dom["name"])
        stack.remove_worker(name)


def native_threads(pid: int, name: str) -> int:
    """How many threads of process `pid` carry the OS thread name `name`."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == name:
                count += 1
        except OSError:
            continue
    return count


@dataclass
class FleetRun:
    """A started fleet (scripts/testbed/fleet.py), a client on its broker, a guest maker."""

    fleet: Fleet
    client: Client
    image: Path
    work: Path
    booted: list[Guest] = field(default_factory=list)

    def guest(self, memory_mib: int = 32, domain_type: str = "qemu") -> Guest:
        name = f"g-{uuid.uuid4().hex[:8]}"
        disk = self.work / f"{name}.img"
        shutil.copyfile(self.image, disk)
        serial = self.work / f"{name}.serial"
        dom_uuid = str(uuid.uuid4())
        xml = guest_xml(name, disk, serial, memory_mib=memory_mib, uuid=dom_uuid,
                        domain_type=domain_type)
        return Guest(name, dom_uuid, xml, disk, serial)

    def boot(self, host: str, guest: Guest) -> Guest:
        self.client.call(host, "define", xml=guest.xml)
        self.booted.append(guest)
        self.client.call(host, "start", domain=guest.name)
        return guest

    def remove_guests(self) -> None:
        """Destroy and undefine every guest booted so far, on whichever hosts it is now."""
        assert self.fleet.stack is not None
        for guest in self.booted:
            for host in live_hosts(self.fleet.stack):
                remove_guest(self.client, host, guest.name)
        self.booted.clear()

    def running_on(self, guest: Guest) -> list[str]:
        """Hosts where this guest's QEMU runs its CPUs now (from each host's dominfo)."""
        where = []
        for host in self.fleet.hosts:
            with contextlib.suppress(Exception):
                info = self.client.call(host, "dominfo", domain=guest.name, timeout=10)
                if info["state"] == "running":
                    where.append(host)
        return where


@contextlib.contextmanager
def fleet_of(names: list[str], base_image: Path, env: dict[str, str] | None = None,
             host_env: dict[str, dict[str, str]] | None = None,
             local_disks: bool = False) -> Iterator[FleetRun]:
    """A fleet of namespace hosts for one test module; skips where namespaces cannot be
    made.  Everything is torn down after, also on failure."""
    reason = netns_available()
    if reason is not None:
        pytest.skip(f"namespace test hosts need CAP_NET_ADMIN and iproute2: {reason}")
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-fl-", dir="/tmp")))
    fleet = Fleet(root=root, extra_env=dict(env or {}),
                  local_disks=root / "disks" if local_disks else None)
    try:
        fleet.start(names, host_env)
        client = Client(load({"FERRY_BROKER_URL": fleet.broker_url}))
        yield FleetRun(fleet, client, base_image, root)
    finally:
        fleet.stop()
        if not os.environ.get("FERRY_TEST_KEEP"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postcopy_hosts(stack: Stack, client: Client) -> Iterator[tuple[str, str]]:
    """(source, dest) for a post-copy migration: alpha and beta when their confined QEMU
    may use userfaultfd; else two extra hosts whose QEMU runs as root (QEMU 7.2 as an
    unprivileged user needs vm.unprivileged_userfaultfd=1), removed after the test
    (their guests through ferry first).  Fails where userfaultfd is refused even to
    root: post-copy is never passed untried."""
    from workers.hostcaps import userfaultfd_available, userfaultfd_for_qemu

    if not userfaultfd_available():
        pytest.fail("post-copy cannot be tested: this kernel refuses userfaultfd here")
    if userfaultfd_for_qemu(confined=client.settings.qemu_user not in ("", "root")):
        yield "alpha", "beta"
        return
    hosts = ("pcsrc", "pcdst")
    try:
        for host in hosts:
            stack.start_worker(host, env={"FERRY_QEMU_USER": ""})
        yield hosts
    finally:
        for host in hosts:
            if host not in stack.workers:
                continue
            with contextlib.suppress(Exception):
                for dom in client.call(host, "list", all=True, timeout=30):
                    remove_guest(client, host, dom["name"])
            stack.remove_worker(host)
