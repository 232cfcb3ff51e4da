"""Guests on bridges, in network namespaces the test makes: the NIC moves with the guest.

Two namespace hosts (scripts/testbed/fleet.py), each with a bridge br0 uplinked to
one root-namespace "switch" where the test itself sits (scripts/testbed/guestlan.py).
A real Linux guest (scripts/testbed/linuxguest.py: Debian's kernel, busybox, TCP echo
on port 7, a tick on its serial port every 100 ms) runs on br0 of one host and is
live-migrated, managed and peer-to-peer: its TCP connection from the test stays open
and answers, pings every 10 ms lose only a few in a row, its boot id stays and its
uptime grows, its MAC stays, its tap moves to the dest's bridge and leaves the
source's, and the self-announcement frames with its MAC appear on the dest's bridge
right after the switch-over.  Then the bad input: a bridge the dest lacks, a tap
name the dest has taken, a MAC already used on the host; a pre-made tap ferry must
not remove; a cancelled migration whose dest tap must go.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.testbed.fleet import ip
from scripts.testbed.guestlan import (
    ETH_P_ARP,
    ETH_P_RARP,
    GUEST_BRIDGE,
    Capture,
    GuestLan,
    Pinger,
)
from scripts.testbed.linuxguest import (
    ECHO_PORT,
    LinuxGuest,
    LinuxGuestError,
    build_guest,
    continuity_problem,
    copied_to,
    domain_xml,
    kernel_cmdline,
    parse_ready,
    parse_ticks,
    read_serial,
)
from scripts.testbed.stack import wait_for
from tests.conftest import FleetRun, fleet_of, qemu_pids_of
from workers.errors import FerryError

pytestmark = pytest.mark.e2e
A, B = "na", "nb"
BOOT_DEADLINE_S = 180.0  # the Linux guest under TCG on a busy 2-core machine
NETWORKS = {"FERRY_NETWORKS": "lan=br0"}
QUIET_S = 3.0


def settle(serial: Path, seconds: float) -> None:
    """Wait until the guest has ticked `seconds` more (its own clock: load-proof)."""
    start = parse_ticks(read_serial(serial))[-1].uptime_s
    wait_for(lambda: parse_ticks(read_serial(serial))[-1].uptime_s >= start + seconds, 120,
             f"{seconds}s of guest uptime")


@dataclass
class Lan:
    run: FleetRun
    lan: GuestLan
    linux: LinuxGuest | None


@pytest.fixture(scope="module")
def net(base_image: Path) -> Iterator[Lan]:
    try:
        linux: LinuxGuest | None = build_guest()
    except LinuxGuestError:
        linux = None
    with fleet_of([A, B], base_image, env=NETWORKS) as run:
        if linux is not None:  # where the confined QEMU reaches it (root's cache: not)
            linux = copied_to(linux, run.fleet.root / "linux")
        lan = GuestLan(run.fleet).start()
        try:
            yield Lan(run, lan, linux)
        finally:
            lan.stop()


def taps(net: Lan, host: str) -> list[str]:
    return [p for p in net.lan.ports(host) if p != "uplink0"]


def connect_echo(address: str, deadline_s: float) -> socket.socket:
    """A connection to the guest's echo service that has echoed once."""
    deadline, last = time.monotonic() + deadline_s, "nothing tried"
    while time.monotonic() < deadline:
        try:
            sock = socket.create_connection((address, ECHO_PORT), timeout=2)
        except OSError as exc:
            last = repr(exc)
            time.sleep(0.2)
            continue
        if echo(sock, b"hello\n") == b"hello\n":
            return sock
        sock.close()
    raise AssertionError(f"echo on {address} not answering: {last}")


def echo(sock: socket.socket, data: bytes, timeout: float = 20) -> bytes:
    sock.settimeout(timeout)
    sock.sendall(data)
    got = b""
    with contextlib.suppress(OSError):
        while len(got) < len(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


class EchoWhileMigrating:
    """Keep the one connection busy (a line every 50 ms) and count answers and failures."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.ok, self.bad = sock, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            line = f"line {n}\n".encode()
            if echo(self.sock, line, timeout=30) == line:
                self.ok += 1
            else:
                self.bad += 1
            self._stop.wait(0.05)

    def __enter__(self) -> EchoWhileMigrating:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(40)


def test_a_linux_guest_keeps_its_connection_and_network_across_live_migrations(
        net: Lan, record_property: Callable[[str, object], None]) -> None:
    if net.linux is None:
        pytest.skip("no Linux guest here (linux-image-amd64, busybox-static)")
    client = net.run.client
    name, mac, addr = f"lin-{uuid.uuid4().hex[:6]}", "52:54:00:17:aa:01", net.lan.guest_ip(1)
    serial = net.run.work / f"{name}.serial"
    xml = domain_xml(name, net.linux, serial, mac=mac, bridge=GUEST_BRIDGE,
                     cmdline=kernel_cmdline(f"{addr}/24", extra=["nokaslr"]),
                     domain_type="qemu")
    client.call(A, "define", xml=xml)
    client.call(A, "start", domain=name)
    wait_for(lambda: parse_ready(read_serial(serial)), BOOT_DEADLINE_S, "the guest to boot")
    (tap,) = taps(net, A)
    assert tap.startswith("vnet") and net.lan.link_address(A, tap) == "fe" + mac[2:]
    sock = connect_echo(addr, 60)
    figures = []
    for p2p, (src, dst) in ((False, (A, B)), (True, (B, A))):
        # A settled guest first: QEMU 7.2 under TCG sometimes freezes a guest migrated
        # while it is busy (just after bringing its NIC up, or under a writer), with
        # or without ferry (docs/limits.md).
        settle(serial, QUIET_S)
        ticks_before = len(parse_ticks(read_serial(serial)))
        pinger = Pinger(addr, 0.01).start()
        capture = Capture(net.run.fleet.hosts[dst].netns, GUEST_BRIDGE, mac).start()
        with EchoWhileMigrating(sock) as talk:
            time.sleep(1)
            summary = client.migrate(name, src, dst, live=True, p2p=p2p).wait(timeout=180)
            switched = time.monotonic()
            time.sleep(2)
        report = pinger.stop()
        frames = capture.stop()
        assert summary["result"] == "completed"
        downtime = (summary.get("statistics") or {}).get("downtime")
        figures.append((p2p, report, downtime))
        print(f"\n{'p2p' if p2p else 'managed'} {src}->{dst}: {report.sent} pings, "
              f"{report.sent - report.received} lost, at most {report.longest_loss} in a row "
              f"(longest gap {report.longest_gap_ms:.0f} ms); QEMU downtime {downtime} ms; "
              f"echo {talk.ok} ok, {talk.bad} failed; announce frames {len(frames)}")
        why = lan_state(net, name, dst) + " regs " + str(
            [client.call(dst, "qemu_monitor_command", domain=name, hmp=True, command=c)
             for c in ("info registers", "x/4i $pc", "info irq")]
            if talk.bad else "") + " frames " + str(
            [(hex(f.ethertype), round(f.at - switched, 2)) for f in frames]) + " ticks " + str(
            parse_ticks(read_serial(serial))[-3:])
        # The connection lived through it and answers on the dest.
        assert talk.bad == 0 and talk.ok > 0, why
        assert echo(sock, b"after\n") == b"after\n"
        # A few pings lost in a row at most (the switch-over and the switch relearning).
        assert report.received > 0 and report.longest_loss <= 100, (report, why)
        # The guest announced itself on the dest's bridge: RARP from QEMU or the guest's
        # own gratuitous ARP, with its MAC, right around the switch-over.
        announced = [f for f in frames if f.ethertype in (ETH_P_RARP, ETH_P_ARP)]
        assert announced, f"no announcement on {dst}'s bridge: {frames[:5]}"
        assert min(abs(f.at - switched) for f in announced) < 5
        # Its tap left the source with it and sits on the dest's bridge.
        assert taps(net, src) == []
        (tap,) = taps(net, dst)
        assert net.lan.link_address(dst, tap) == "fe" + mac[2:]
        info = client.call(dst, "dominfo", domain=name)
        assert (info["state"], info["reason"]) == ("running", "migrated")
        assert f'<mac address="{mac}"/>' in client.call(dst, "dumpxml", domain=name)
        assert qemu_pids_of(client.call(dst, "dumpxml", domain=name).split("<uuid>")[1]
                            .split("<")[0]) == [info["pid"]]
        wait_for(lambda n=ticks_before: len(parse_ticks(read_serial(serial))) > n + 10, 60,
                 "ticks on the dest")
    ticks = parse_ticks(read_serial(serial))
    assert continuity_problem(ticks) is None  # one boot id, counter and uptime only grow
    sock.close()
    client.call(A, "destroy", domain=name)
    client.call(A, "undefine", domain=name)
    assert taps(net, A) == []
    for p2p, report, downtime in figures:
        kind = "p2p" if p2p else "managed"
        record_property(f"{kind}_longest_ping_loss", report.longest_loss)
        record_property(f"{kind}_qemu_downtime_ms", downtime)


def lan_state(net: Lan, name: str, dst: str) -> str:
    """For a failure message: the guest on the dest and where the switch sends its MAC."""
    info = net.run.client.call(dst, "dominfo", domain=name)
    fdb = ip("-o", "link", "show", "master", net.lan.switch).stdout.count("\n")
    learned = [line for line in subprocess.run(
        ["bridge", "fdb", "show", "br", net.lan.switch], capture_output=True, text=True,
        check=False).stdout.splitlines() if line.startswith("52:54:00")]
    inside = [line for line in subprocess.run(
        ["bridge", "-n", net.run.fleet.hosts[dst].netns, "fdb", "show", "br", GUEST_BRIDGE],
        capture_output=True, text=True, check=False).stdout.splitlines()
        if line.startswith("52:54:00")]
    return (f"dest {info['state']}:{info['reason']}; switch ports {fdb}; switch learned "
            f"{learned}; dest bridge learned {inside}")


def tiny(net: Lan, nic: str, host: str = A, start: bool = True) -> str:
    """The tiny test guest with `nic` (an <interface> element), defined (and started)."""
    guest = net.run.guest(memory_mib=32)
    xml = guest.xml.replace("<memballoon", nic + "\n    <memballoon")
    net.run.client.call(host, "define", xml=xml)
    if start:
        net.run.client.call(host, "start", domain=guest.name)
    return guest.name


def nic(kind: str = "bridge", source: str = "bridge='br0'", mac: str = "52:54:00:17:bb:01",
        extra: str = "") -> str:
    src = f"<source {source}/>" if source else ""
    return (f"<interface type='{kind}'><mac address='{mac}'/>{src}{extra}"
            "<model type='virtio'/></interface>")


@pytest.fixture
def cleanup(net: Lan) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        for host in (A, B):
            for task in ("destroy", "undefine"):
                with contextlib.suppress(FerryError):
                    net.run.client.call(host, task, domain=name)


def test_a_nic_on_a_named_network_lands_on_the_bridge_each_host_maps_it_to(
        net: Lan, cleanup: list[str]) -> None:
    name = tiny(net, nic("network", "network='lan'", "52:54:00:17:bb:02"))
    cleanup.append(name)
    assert len(taps(net, A)) == 1
    net.run.client.migrate(name, A, B, live=True).wait(timeout=90)
    assert taps(net, A) == [] and len(taps(net, B)) == 1
    net.run.client.migrate(name, B, A, live=True, p2p=True).wait(timeout=90)
    assert taps(net, B) == [] and len(taps(net, A)) == 1


def test_a_bridge_missing_on_the_dest_is_refused_in_prepare_and_the_source_runs_on(
        net: Lan, cleanup: list[str]) -> None:
    ns = net.run.fleet.hosts[A].netns
    ip("-n", ns, "link", "add", "brsrc", "type", "bridge")
    ip("-n", ns, "link", "set", "brsrc", "up")
    try:
        name = tiny(net, nic(source="bridge='brsrc'", mac="52:54:00:17:bb:03"))
        cleanup.append(name)
        pid = net.run.client.call(A, "dominfo", domain=name)["pid"]
        for p2p in (False, True):
            job = net.run.client.migrate(name, A, B, live=True, p2p=p2p)
            with pytest.raises(FerryError, match="bridge 'brsrc' of interface "
                               "52:54:00:17:bb:03 does not exist") as err:
                job.wait(timeout=60)
            assert "prepare" in str(err.value) and f"host {B}" in str(err.value)
            info = net.run.client.call(A, "dominfo", domain=name)
            assert (info["state"], info["pid"]) == ("running", pid)
            assert taps(net, B) == []
    finally:
        with contextlib.suppress(FerryError):
            net.run.client.call(A, "destroy", domain=name)
        ip("-n", ns, "link", "del", "brsrc", check=False)


def test_a_tap_name_taken_on_the_dest_is_refused_and_nothing_is_left_there(
        net: Lan, cleanup: list[str]) -> None:
    ns = net.run.fleet.hosts[B].netns
    ip("-n", ns, "link", "add", "gtap0", "type", "bridge")  # any device holds the name
    try:
        name = tiny(net, nic(mac="52:54:00:17:bb:04", extra="<target dev='gtap0'/>"))
        cleanup.append(name)
        assert taps(net, A) == ["gtap0"]
        with pytest.raises(FerryError, match=r"tap name 'gtap0' of interface .* is taken"):
            net.run.client.migrate(name, A, B, live=True).wait(timeout=60)
        assert net.run.client.call(A, "dominfo", domain=name)["state"] == "running"
        assert taps(net, B) == []
    finally:
        ip("-n", ns, "link", "del", "gtap0", check=False)


def test_a_second_guest_with_a_mac_in_use_on_the_host_is_refused(
        net: Lan, cleanup: list[str]) -> None:
    first = tiny(net, nic(mac="52:54:00:17:bb:05"))
    cleanup.append(first)
    second = tiny(net, nic(mac="52:54:00:17:bb:05"), start=False)
    cleanup.append(second)
    with pytest.raises(FerryError, match=f"mac address 52:54:00:17:bb:05 of '{second}' is "
                       f"already used by guest '{first}'"):
        net.run.client.call(A, "start", domain=second)
    assert len(taps(net, A)) == 1


def test_a_pre_made_tap_is_used_and_left_in_place(net: Lan, cleanup: list[str]) -> None:
    ns = net.run.fleet.hosts[A].netns
    ip("-n", ns, "tuntap", "add", "dev", "ptap0", "mode", "tap")
    try:
        name = tiny(net, nic("ethernet", "", "52:54:00:17:bb:06",
                             "<target dev='ptap0' managed='no'/>"))
        cleanup.append(name)
        net.run.client.call(A, "destroy", domain=name)
        assert "ptap0" in ip("-n", ns, "-o", "link", "show").stdout
    finally:
        ip("-n", ns, "link", "del", "ptap0", check=False)


def test_a_cancelled_migration_removes_the_dest_tap_and_keeps_the_source(
        net: Lan, cleanup: list[str]) -> None:
    name = tiny(net, nic(mac="52:54:00:17:bb:07"))
    cleanup.append(name)
    job = net.run.client.migrate(name, A, B, live=True, bandwidth_mib_s=1)
    wait_for(lambda: taps(net, B), 60, "the dest's tap (Prepare done)")
    job.abort()
    with pytest.raises(FerryError):
        job.wait(timeout=60)
    wait_for(lambda: taps(net, B) == [], 30, "the dest's tap to go")
    assert net.run.client.call(A, "dominfo", domain=name)["state"] == "running"
    assert len(taps(net, A)) == 1


# ---------------------------------------------------------------- macvtap (type='direct')

PARENT = "dlink0"


@pytest.fixture(scope="module")
def direct_links(net: Lan) -> Iterator[None]:
    """In every host a plain (unbridged) link `dlink0` to the switch: a macvtap's parent."""
    made = []
    try:
        for octet, host in enumerate(net.run.fleet.hosts.values(), start=11):
            root_end = f"fm{net.run.fleet.suffix}{octet}"
            ip("link", "add", root_end, "type", "veth", "peer", "name", PARENT, "netns",
               host.netns)
            made.append(root_end)
            ip("link", "set", root_end, "master", net.lan.switch, "up")
            ip("-n", host.netns, "link", "set", PARENT, "up")
        yield
    finally:
        for link in made:
            ip("link", "del", link, check=False)


def macvtaps(net: Lan, host: str) -> dict[str, tuple[str, str]]:
    """The macvtaps of `host`: name -> (parent, MAC)."""
    out = ip("-n", net.run.fleet.hosts[host].netns, "-o", "link", "show", "type",
             "macvtap").stdout
    found = {}
    for line in out.splitlines():
        name, parent = line.split(":")[1].strip().split("@")
        found[name] = (parent, line.split("link/ether ")[1].split()[0])
    return found


def direct_nic(mac: str, parent: str = PARENT) -> str:
    return nic("direct", f"dev='{parent}' mode='bridge'", mac)


def test_a_macvtap_nic_moves_to_the_dests_macvtap_and_announces_itself_there(
        net: Lan, direct_links: None, cleanup: list[str]) -> None:
    mac = "52:54:00:17:cc:01"
    name = tiny(net, direct_nic(mac))
    cleanup.append(name)
    ((tap, (parent, address)),) = macvtaps(net, A).items()
    assert tap.startswith("macvtap") and (parent, address) == (PARENT, mac)
    live = net.run.client.call(A, "dumpxml", domain=name)
    assert f'<target dev="{tap}"/>' in live and f'<source dev="{PARENT}" mode="bridge"/>' in live
    for p2p, (src, dst) in ((False, (A, B)), (True, (B, A))):
        capture = Capture(net.run.fleet.hosts[dst].netns, PARENT, mac).start()
        summary = net.run.client.migrate(name, src, dst, live=True, p2p=p2p).wait(timeout=90)
        assert summary["result"] == "completed"
        # QEMU's self-announcement leaves through the dest's macvtap onto its parent.
        wait_for(lambda: any(f.ethertype == ETH_P_RARP for f in capture.frames), 30,  # noqa: B023
                 "the guest's RARP on the dest's macvtap parent")
        capture.stop()
        assert macvtaps(net, src) == {}
        assert [v for v in macvtaps(net, dst).values()] == [(PARENT, mac)]
    net.run.client.call(A, "destroy", domain=name)
    assert macvtaps(net, A) == {}


def test_a_macvtap_parent_missing_on_the_dest_is_refused_in_prepare_naming_it(
        net: Lan, direct_links: None, cleanup: list[str]) -> None:
    ns = net.run.fleet.hosts[A].netns
    ip("-n", ns, "link", "add", "donly0", "type", "veth", "peer", "name", "donly1")
    try:
        ip("-n", ns, "link", "set", "donly0", "up")
        name = tiny(net, direct_nic("52:54:00:17:cc:02", "donly0"))
        cleanup.append(name)
        pid = net.run.client.call(A, "dominfo", domain=name)["pid"]
        with pytest.raises(FerryError, match="direct source dev 'donly0' of interface "
                           "52:54:00:17:cc:02 does not exist") as err:
            net.run.client.migrate(name, A, B, live=True).wait(timeout=60)
        assert "prepare" in str(err.value) and f"host {B}" in str(err.value)
        assert net.run.client.call(A, "dominfo", domain=name)["pid"] == pid
        assert macvtaps(net, B) == {} and len(macvtaps(net, A)) == 1
        net.run.client.call(A, "destroy", domain=name)
        assert macvtaps(net, A) == {}
    finally:
        ip("-n", ns, "link", "del", "donly0", check=False)


def test_a_linux_guest_on_a_macvtap_keeps_its_connection_across_live_migrations(
        net: Lan, direct_links: None, cleanup: list[str]) -> None:
    """Traffic both ways through the macvtaps: a TCP connection from the test (on the
    switch) to the guest's echo service lives through a managed and a p2p move."""
    if net.linux is None:
        pytest.skip("no Linux guest here (linux-image-amd64, busybox-static)")
    client = net.run.client
    name, mac, addr = f"lmv-{uuid.uuid4().hex[:6]}", "52:54:00:17:cc:03", net.lan.guest_ip(3)
    cleanup.append(name)
    serial = net.run.work / f"{name}.serial"
    xml = domain_xml(name, net.linux, serial, mac=mac, bridge=GUEST_BRIDGE,
                     cmdline=kernel_cmdline(f"{addr}/24", extra=["nokaslr"]),
                     domain_type="qemu")
    bridged = f"<interface type='bridge'>\n      <source bridge='{GUEST_BRIDGE}'/>"
    assert bridged in xml
    xml = xml.replace(bridged, f"<interface type='direct'>\n      <source dev='{PARENT}' "
                      "mode='bridge'/>")
    client.call(A, "define", xml=xml)
    client.call(A, "start", domain=name)
    wait_for(lambda: parse_ready(read_serial(serial)), BOOT_DEADLINE_S, "the guest to boot")
    assert list(macvtaps(net, A).values()) == [(PARENT, mac)]
    sock = connect_echo(addr, 60)
    for p2p, (src, dst) in ((False, (A, B)), (True, (B, A))):
        settle(serial, QUIET_S)  # see the bridged Linux guest test
        with EchoWhileMigrating(sock) as talk:
            time.sleep(1)
            summary = client.migrate(name, src, dst, live=True, p2p=p2p).wait(timeout=180)
            time.sleep(2)
        assert summary["result"] == "completed"
        assert talk.bad == 0 and talk.ok > 0
        assert echo(sock, b"after\n") == b"after\n"
        assert macvtaps(net, src) == {} and list(macvtaps(net, dst).values()) == [(PARENT, mac)]
    assert continuity_problem(parse_ticks(read_serial(serial))) is None
    sock.close()
