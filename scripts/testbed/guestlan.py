"""A guest LAN for a namespace fleet (scripts/testbed/fleet.py), and ways to watch it.

Each host of the fleet gets a bridge ``br0`` inside its namespace (where its
worker puts the guests' taps) with an uplink veth to one bridge in the root
namespace: the "switch" all hosts share, which also carries the test's own
address.  A guest on br0 of host A is reached from the root namespace through A's
uplink; once it runs on B, the switch must learn its MAC on B's uplink: that is
what the self-announcement after a migration is for, and what the ping gap
measures.  Addresses: 198.18.T.0/24 (RFC 2544's benchmark range), T picked free.

Watching: `Pinger` sends ICMP echo every `interval` from the root namespace and
reports the longest run of lost replies; `capture` reads frames from a bridge
inside a host's namespace with an AF_PACKET socket (the thread that opens it
enters the namespace with setns(2)).  Both need root, as the fleet does.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from scripts.testbed.fleet import DATA_NET, Fleet, ip

GUEST_BRIDGE = "br0"
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035


@dataclass
class GuestLan:
    """br0 in every host of `fleet`, all uplinked to one root-namespace bridge."""

    fleet: Fleet
    subnet: int = 0
    _links: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"fg{self.fleet.suffix}"

    @property
    def gateway(self) -> str:
        """The test's own address on the LAN."""
        return f"{DATA_NET}.{self.subnet}.1"

    def guest_ip(self, n: int) -> str:
        return f"{DATA_NET}.{self.subnet}.{100 + n}"

    def start(self) -> GuestLan:
        try:
            used = ip("-4", "-o", "addr").stdout + ip("-4", "route").stdout
            self.subnet = next(s for s in (secrets.randbelow(254) + 1 for _ in range(200))
                               if f"{DATA_NET}.{s}." not in used and s != self.fleet.subnet)
            ip("link", "add", self.switch, "type", "bridge")
            self._links.append(self.switch)
            # No forwarding delay: a port carries frames the moment it is up.
            ip("link", "set", self.switch, "type", "bridge", "forward_delay", "0")
            ip("addr", "add", f"{self.gateway}/24", "dev", self.switch)
            ip("link", "set", self.switch, "up")
            for octet, host in enumerate(self.fleet.hosts.values(), start=11):
                ns, uplink = host.netns, f"fu{self.fleet.suffix}{octet}"
                ip("-n", ns, "link", "add", GUEST_BRIDGE, "type", "bridge")
                ip("-n", ns, "link", "set", GUEST_BRIDGE, "type", "bridge", "forward_delay", "0")
                ip("link", "add", uplink, "type", "veth", "peer", "name", "uplink0", "netns", ns)
                self._links.append(uplink)
                ip("link", "set", uplink, "master", self.switch, "up")
                ip("-n", ns, "link", "set", "uplink0", "master", GUEST_BRIDGE, "up")
                ip("-n", ns, "link", "set", GUEST_BRIDGE, "up")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """The root-namespace links; br0 goes with each host's namespace."""
        for link in reversed(self._links):
            ip("link", "del", link, check=False)
        self._links.clear()

    def ports(self, host: str) -> list[str]:
        """The interfaces on host `host`'s br0 (its uplink and the guests' taps)."""
        ns = self.fleet.hosts[host].netns
        out = ip("-n", ns, "-o", "link", "show", "master", GUEST_BRIDGE).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
                if line.strip()]

    def link_address(self, host: str, dev: str) -> str:
        out = ip("-n", self.fleet.hosts[host].netns, "-o", "link", "show", dev).stdout
        return out.split("link/ether ")[1].split()[0]


# -- frames on a bridge inside a namespace -------------------------------------------------


@dataclass
class Frame:
    at: float  # time.monotonic()
    src: str
    ethertype: int


class Capture:
    """Frames from one MAC on a device of a namespace, read by a thread until `stop`."""

    def __init__(self, netns: str, dev: str, mac: str) -> None:
        self.netns, self.dev, self.mac = netns, dev, mac.lower()
        self.frames: list[Frame] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Capture:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> list[Frame]:
        self._stop.set()
        self._thread.join(5)
        return self.frames

    def _run(self) -> None:
        try:
            sock = _packet_socket_in(self.netns, self.dev)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        with sock:
            sock.settimeout(0.1)
            while not self._stop.is_set():
                try:
                    data = sock.recv(2048)
                except TimeoutError:
                    continue
                src = ":".join(f"{b:02x}" for b in data[6:12])
                if src == self.mac and len(data) >= 14:
                    (ethertype,) = struct.unpack("!H", data[12:14])
                    self.frames.append(Frame(time.monotonic(), src, ethertype))


def _packet_socket_in(netns: str, dev: str) -> socket.socket:
    """An AF_PACKET socket bound to `dev` of namespace `netns`; this thread goes back to
    its own namespace afterwards (a socket stays in the namespace it was made in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.bind((dev, 0))
        finally:
            libc.setns(own, CLONE_NEWNET)
    finally:
        os.close(own)
        os.close(target)
    return sock


# -- ping ----------------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


@dataclass
class PingReport:
    sent: int
    received: int
    longest_loss: int  # replies lost in a row
    longest_gap_ms: float  # longest time without a reply while pinging


class Pinger:
    """ICMP echo to `address` every `interval` s from a raw socket (root), until stopped."""

    def __init__(self, address: str, interval: float = 0.01) -> None:
        self.address, self.interval = address, interval
        self.ident = secrets.randbelow(0xFFFF)
        self.sent: dict[int, float] = {}
        self.replies: dict[int, float] = {}
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self._sock.settimeout(0.05)
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]

    def start(self) -> Pinger:
        for t in self._threads:
            t.start()
        return self

    def _send(self) -> None:
        seq = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            seq = (seq + 1) & 0xFFFF
            head = struct.pack("!BBHHH", 8, 0, 0, self.ident, seq)
            body = struct.pack("!d", time.monotonic())
            packet = struct.pack("!BBHHH", 8, 0, _checksum(head + body), self.ident, seq) + body
            self.sent[seq] = time.monotonic()
            with contextlib.suppress(OSError):
                self._sock.sendto(packet, (self.address, 0))
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(2048)
            except (TimeoutError, OSError):
                continue
            ihl = (data[0] & 0x0F) * 4
            kind, _code, _sum, ident, seq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if kind == 0 and ident == self.ident:
                self.replies.setdefault(seq, time.monotonic())

    def stop(self) -> PingReport:
        """Stop; replies to the last 0.5 s of probes are waited for, then not counted."""
        time.sleep(0.5)
        self._stop.set()
        for t in self._threads:
            t.join(2)
        self._sock.close()
        cutoff = time.monotonic() - 0.5
        seqs = sorted(s for s, at in self.sent.items() if at < cutoff)
        run = longest = 0
        for s in seqs:
            run = 0 if s in self.replies else run + 1
            longest = max(longest, run)
        times = sorted(self.replies.values())
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return PingReport(len(seqs), sum(1 for s in seqs if s in self.replies), longest,
                          max(gaps, default=0.0) * 1000)
