"""A test fleet: hosts with their own network addresses, on one machine.

Each host is a Linux network namespace with two veth links into the root
namespace: a *data* link on one bridge (its migration address, 198.18.S.0/24)
and a *broker* link on another (198.19.S.0/24), where one redis-server
listens (password protected) on the bridge address.  Its `ferry worker`
runs inside the namespace (`ip netns exec`), so the QEMU processes it starts
live there too.  Two links per host let a test cut the migration path while
the broker stays reachable (`cut(host, data=True)`), or both.

With `local_disks` (a path), each host also gets a mount namespace in which that
path holds the host's own directory (`host_disks(name)` from outside): a guest's
disk at one path is a different file on each host, as local disks on separate
machines are (scripts/testbed/mountns.py).

Nothing is routed off the machine: the namespaces have no default route and
the subnets exist only on the two bridges.  Names carry a random suffix so
several fleets can run at once; `stop()` removes every process (by pid),
namespace, link and bridge, also after a failure half-way through `start()`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from scripts.testbed.stack import Stack, Worker

DATA_NET = "198.18"  # 198.18.0.0/15 is reserved for benchmark networks (RFC 2544)
BROKER_NET = "198.19"
FIRST_HOST = 11


class FleetUnavailable(RuntimeError):
    """This machine cannot make network namespaces (no CAP_NET_ADMIN, no iproute2)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def netns_available() -> str | None:
    """None if namespaces can be made here (tried for real), else why not."""
    name = f"ferry-probe-{secrets.token_hex(3)}"
    try:
        proc = ip("netns", "add", name, check=False)
    except FileNotFoundError:
        return "iproute2 (`ip`) is not installed"
    if proc.returncode != 0:
        return f"cannot create network namespaces: {proc.stderr.strip()}"
    ip("netns", "del", name, check=False)
    return None


def _free_subnet() -> int:
    """A third octet S with 198.18.S.0/24 and 198.19.S.0/24 unused on this machine."""
    used = ip("-4", "-o", "addr").stdout + ip("-4", "route").stdout
    for _ in range(100):
        s = 1 + secrets.randbelow(254)
        if f"{DATA_NET}.{s}." not in used and f"{BROKER_NET}.{s}." not in used:
            return s
    raise RuntimeError("no free 198.18.S.0/24 subnet")


@dataclass
class FleetHost:
    name: str
    netns: str
    address: str  # migration address (data link)
    broker_address: str
    data_link: str  # root-namespace end of the data veth
    broker_link: str
    worker: Worker | None = None


@dataclass
class Fleet:
    root: Path
    log_level: str = "DEBUG"
    extra_env: dict[str, str] = field(default_factory=dict)
    suffix: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: int = 0
    hosts: dict[str, FleetHost] = field(default_factory=dict)
    stack: Stack | None = None
    local_disks: Path | None = None  # a path each host sees its own files at
    _links: list[str] = field(default_factory=list)
    _netns: list[str] = field(default_factory=list)

    @property
    def data_bridge(self) -> str:
        return f"fd{self.suffix}"

    @property
    def broker_bridge(self) -> str:
        return f"fb{self.suffix}"

    @property
    def broker_url(self) -> str:
        assert self.stack is not None
        return self.stack.broker_url

    def start(self, names: list[str],
              host_env: dict[str, dict[str, str]] | None = None) -> Fleet:
        """Bridges, one namespace per host, redis on the broker bridge, the workers
        (`host_env`: extra environment of some hosts, e.g. failpoints)."""
        reason = netns_available()
        if reason is not None:
            raise FleetUnavailable(reason)
        try:
            self.subnet = _free_subnet()
            self._bridge(self.data_bridge, f"{DATA_NET}.{self.subnet}.1/24")
            self._bridge(self.broker_bridge, f"{BROKER_NET}.{self.subnet}.1/24")
            for i, name in enumerate(names):
                self._host(name, FIRST_HOST + i)
            self.stack = Stack(root=self.root, log_level=self.log_level,
                               extra_env=dict(self.extra_env))
            self.stack.start_redis(password=secrets.token_hex(16),
                                   bind=f"{BROKER_NET}.{self.subnet}.1")
            for name in names:
                self.start_worker(name, wait=False, env=(host_env or {}).get(name))
            for name in names:
                self.wait_alive(name)
        except BaseException:
            self.stop()
            raise
        return self

    def _bridge(self, name: str, cidr: str) -> None:
        ip("link", "add", name, "type", "bridge")
        self._links.append(name)
        ip("addr", "add", cidr, "dev", name)
        ip("link", "set", name, "up")

    def _host(self, name: str, octet: int) -> None:
        ns = f"ferry-{self.suffix}-{name}"
        ip("netns", "add", ns)
        self._netns.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        host = FleetHost(name, ns, f"{DATA_NET}.{self.subnet}.{octet}",
                         f"{BROKER_NET}.{self.subnet}.{octet}",
                         f"fd{self.suffix}{octet}", f"fb{self.suffix}{octet}")
        for link, inner, bridge, addr in (
                (host.data_link, "data0", self.data_bridge, host.address),
                (host.broker_link, "broker0", self.broker_bridge, host.broker_address)):
            ip("link", "add", link, "type", "veth", "peer", "name", inner, "netns", ns)
            self._links.append(link)
            ip("link", "set", link, "master", bridge, "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")
        self.hosts[name] = host

    def start_worker(self, name: str, wait: bool = True,
                     env: dict[str, str] | None = None) -> Worker:
        """(Re)start host `name`'s worker inside its namespace."""
        assert self.stack is not None
        host = self.hosts[name]
        prefix: tuple[str, ...] = ("ip", "netns", "exec", host.netns)
        if self.local_disks is not None:
            self.local_disks.mkdir(parents=True, exist_ok=True)
            own = self.host_disks(name)
            own.mkdir(parents=True, exist_ok=True)
            prefix += (sys.executable, "-m", "scripts.testbed.mountns", "--bind",
                       f"{own}:{self.local_disks}", "--")
        host.worker = self.stack.start_worker(
            name, wait=False, prefix=prefix,
            env={"FERRY_MIGRATION_ADDRESS": host.address, **(env or {})})
        if wait:
            self.wait_alive(name)
        return host.worker

    def host_disks(self, name: str) -> Path:
        """Where host `name`'s own files behind `local_disks` are, seen from outside."""
        return self.root / "hosts" / name / "disks"

    def wait_alive(self, name: str) -> None:
        """Up when its heartbeat names the pid we started (so `ip netns exec` exec'd)."""
        assert self.stack is not None
        proc = self.stack.workers[name].proc
        assert proc is not None
        self.stack.wait_alive(name, proc.pid)

    def set_link(self, name: str, *, data: bool | None = None,
                 broker: bool | None = None) -> None:
        """Bring host `name`'s links down (False) or up (True), inside its namespace:
        the host's end of the veth goes down, its peer loses carrier, the bridge
        drops what is sent to it.  A real cut, not a filter."""
        host = self.hosts[name]
        for wanted, inner in ((data, "data0"), (broker, "broker0")):
            if wanted is not None:
                ip("-n", host.netns, "link", "set", inner, "up" if wanted else "down")

    def netns_inode(self, name: str) -> int:
        """The inode of host `name`'s network namespace (compare /proc/PID/ns/net)."""
        return Path(f"/run/netns/{self.hosts[name].netns}").stat().st_ino

    def listeners(self, name: str) -> list[tuple[str, int, int]]:
        """(address, port, inode) of every TCP socket listening in host `name`'s namespace
        (from /proc/net/tcp as a process inside it sees it)."""
        proc = subprocess.run(["ip", "netns", "exec", self.hosts[name].netns, "cat",
                               "/proc/net/tcp"], capture_output=True, text=True, timeout=10,
                              check=True)
        return parse_listeners(proc.stdout)

    def stop(self) -> None:
        """Every worker and guest (by pid), then namespaces, links, bridges."""
        if self.stack is not None:
            self.stack.stop(kill_guests=True)
        for link in reversed(self._links):
            ip("link", "del", link, check=False)
        for ns in self._netns:
            ip("netns", "del", ns, check=False)
        self._links.clear()
        self._netns.clear()


def parse_listeners(proc_net_tcp: str) -> list[tuple[str, int, int]]:
    """LISTEN sockets of a /proc/net/tcp text: (dotted address, port, inode)."""
    out = []
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A":  # 0A = TCP_LISTEN
            continue
        hexaddr, hexport = fields[1].split(":")
        addr = str(ipaddress.IPv4Address(bytes.fromhex(hexaddr)[::-1]))
        out.append((addr, int(hexport, 16), int(fields[9])))
    return out


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds open."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = fd.readlink().as_posix()
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes
