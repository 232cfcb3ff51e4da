"""Tap devices for a guest's NICs, made by the host before QEMU starts (start, Prepare, restore).

How (libvirt's way, without a shell or a netlink library): the tap is created by
opening /dev/net/tun and TUNSETIFF, so the file descriptor QEMU gets (``-netdev
tap,fd=N``) is the one that made it; ``ip link`` (iproute2, spawned without a
shell) gives it libvirt's host-side MAC (the guest's with its first byte 0xfe, so
the bridge never takes the guest's address as its own), puts it on its bridge and
brings it up.  A tap ferry makes is not persistent: the kernel removes it when the
last descriptor closes, that is when QEMU exits, so it goes with the guest however
QEMU ends (Confirm on the source, Finish's cancelled form on the dest, a crash),
and a failed start leaves none behind.  A tap someone else made (``type='ethernet'``
with ``<target managed='no'>``) is only opened, and stays.

Names: a user's ``<target dev>`` must be free on this host (one in use is refused
by name); without one the kernel picks the next free ``vnetN``.  vhost-net is used
for virtio NICs where /dev/vhost-net can be opened.

macvtap (``type='direct'``, mode bridge), libvirt's way too: ``ip link add link
PARENT name macvtapN address MAC type macvtap mode bridge`` (the guest's own MAC:
macvtap delivers by destination address), up, then its character device
(``/dev/tapIFINDEX``, whose numbers sysfs gives) is opened and handed to QEMU as a
tap fd.  Without udev that node may not exist: the host then makes a private one
(mknod in a fresh directory, opened and removed at once).  A macvtap outlives its
descriptors, so the host deletes it when QEMU exits (workers/agent.py) and when a
start fails before QEMU runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from workers.devices import Interface
from workers.domain import DomainDef
from workers.errors import FerryError, InvalidInputError, UnsupportedError

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
VHOST_DEVICE = "/dev/vhost-net"
SYS_NET = Path("/sys/class/net")
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
AUTO_NAME = "vnet%d"


class NetworkError(InvalidInputError):
    """This host cannot give a NIC what its definition asks for (no such bridge or
    network, a tap name taken); nothing was started."""


@dataclass
class Tap:
    """An open tap for interface `index` of a definition; QEMU inherits `fd`."""

    index: int
    name: str
    fd: int
    vhostfd: int | None = None
    macvtap: bool = False  # a link that outlives its fd: deleted by remove_macvtaps

    def close(self) -> None:
        for fd in (self.fd, self.vhostfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


def host_mac(mac: str) -> str:
    """libvirt's tap MAC: the guest's with 0xfe first, so the bridge keeps its own."""
    return "fe" + mac[2:]


def bridge_of(n: Interface, networks: Mapping[str, str], host: str) -> str | None:
    """The bridge this host puts interface `n` on (None: no bridge)."""
    if n.type == "bridge":
        return n.source
    if n.type == "network":
        assert n.source is not None
        if n.source not in networks:
            known = ", ".join(sorted(networks)) or "none"
            raise NetworkError(f"network '{n.source}' of interface {n.mac} is not defined "
                               f"(FERRY_NETWORKS: {known})", host=host)
        return networks[n.source]
    return None


def check_networks(d: DomainDef, networks: Mapping[str, str], host: str) -> None:
    """Every bridge and network the NICs name exists here, every tap name asked for is
    free (or, unmanaged, exists): what Prepare checks before QEMU starts."""
    for n in d.interfaces:
        if not n.tap:
            continue
        if n.type == "direct" and not (SYS_NET / str(n.source)).exists():
            raise NetworkError(f"direct source dev '{n.source}' of interface {n.mac} does "
                               "not exist", host=host)
        bridge = bridge_of(n, networks, host)
        if bridge is not None and not (SYS_NET / bridge / "bridge").is_dir():
            raise NetworkError(f"bridge '{bridge}' of interface {n.mac} does not exist",
                               host=host)
        name = n.target_dev
        if name is None:
            continue
        exists = (SYS_NET / name).exists()
        if n.managed and exists:
            raise NetworkError(f"tap name '{name}' of interface {n.mac} is taken",
                               host=host)
        if not n.managed and not exists:
            raise NetworkError(f"tap '{name}' of interface {n.mac} does not exist "
                               f"{host} (target managed='no': someone else makes it)",
                               host=host)


def check_macs(d: DomainDef, others: Sequence[DomainDef], host: str) -> None:
    """No two guests on one host with one MAC (the bridge could not tell them apart)."""
    mine = {n.mac for n in d.interfaces}
    for other in others:
        for n in other.interfaces:
            if n.mac in mine:
                raise NetworkError(f"mac address {n.mac} of '{d.name}' is already used by "
                                   f"guest '{other.name}'", host=host)


def open_taps(d: DomainDef, networks: Mapping[str, str], host: str) -> list[Tap]:
    """A tap for every tap NIC of `d`, on its bridge and up; all or none."""
    check_networks(d, networks, host)
    taps: list[Tap] = []
    try:
        for i, n in enumerate(d.interfaces):
            if n.type == "direct":
                taps.append(_open_macvtap(i, n, host))
            elif n.tap:
                taps.append(_open_tap(i, n, bridge_of(n, networks, host), host))
    except BaseException:
        discard(taps, host)
        raise
    return taps


def discard(taps: Sequence[Tap], host: str) -> None:
    """Close taps no QEMU got, and delete the macvtaps among them."""
    for tap in taps:
        tap.close()
    remove_links([t.name for t in taps if t.macvtap], host)


def remove_macvtaps(d: DomainDef, host: str) -> None:
    """QEMU of `d` exited: its macvtaps (named in its live definition) go too."""
    remove_links([n.target_dev for n in d.interfaces
                  if n.type == "direct" and n.target_dev], host)


def remove_links(names: Sequence[str], host: str) -> None:
    for name in names:
        try:
            _ip(host, "link", "del", "dev", name)
        except FerryError as exc:  # already gone (deleted by hand, its parent removed)
            log.warning("macvtap %s: %s", name, exc.message)


def _open_macvtap(index: int, n: Interface, host: str) -> Tap:
    name = n.target_dev
    for k in range(1000 if name is None else 1):
        candidate = name or f"macvtap{k}"
        if name is None and (SYS_NET / candidate).exists():
            continue
        try:
            _ip(host, "link", "add", "link", str(n.source), "name", candidate, "address", n.mac,
                "type", "macvtap", "mode", "bridge")
        except NetworkError as exc:
            if name is None and "exists" in exc.message:
                continue  # another guest took it meanwhile
            raise
        break
    else:
        raise NetworkError(f"no free macvtap name for interface {n.mac}", host=host)
    try:
        _ip(host, "link", "set", "dev", candidate, "up")
        tap = Tap(index, candidate, _open_macvtap_dev(candidate, host), macvtap=True)
    except BaseException:
        remove_links([candidate], host)
        raise
    if n.model == "virtio" and os.path.exists(VHOST_DEVICE):
        with contextlib.suppress(OSError):
            tap.vhostfd = os.open(VHOST_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    log.info("macvtap %s for %s on %s (vhost %s)", candidate, n.mac, n.source,
             tap.vhostfd is not None)
    return tap


def _open_macvtap_dev(name: str, host: str) -> int:
    """The macvtap's character device, opened: /dev/tapN, or a private node for it."""
    try:
        ifindex = int((SYS_NET / name / "ifindex").read_text())
        major, minor = (int(x) for x in
                        (SYS_NET / name / "macvtap" / f"tap{ifindex}" / "dev").read_text()
                        .split(":"))
        rdev = os.makedev(major, minor)
        node = Path(f"/dev/tap{ifindex}")
        if node.is_char_device() and node.stat().st_rdev == rdev:
            return os.open(node, os.O_RDWR | os.O_CLOEXEC)
        with tempfile.TemporaryDirectory(prefix="ferry-macvtap-") as tmp:
            private = os.path.join(tmp, f"tap{ifindex}")
            os.mknod(private, 0o600 | stat.S_IFCHR, rdev)
            return os.open(private, os.O_RDWR | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        raise NetworkError(f"cannot open the character device of macvtap '{name}': {exc}",
                           host=host) from None


def _open_tap(index: int, n: Interface, bridge: str | None, host: str) -> Tap:
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if n.model == "virtio" else 0)
    wanted = n.target_dev or AUTO_NAME
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise UnsupportedError(f"cannot open {TUN_DEVICE}: {exc.strerror}",
                               host=host) from None
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", wanted.encode(), flags))
    except OSError as exc:
        os.close(fd)
        why = {errno.EBUSY: "is in use", errno.EPERM: "may not be opened by this user",
               errno.EINVAL: "is not a tap"}.get(exc.errno or 0, exc.strerror)
        raise NetworkError(f"tap '{wanted}' of interface {n.mac} {why}",
                           host=host) from None
    tap = Tap(index, ifr[:16].split(b"\0", 1)[0].decode(), fd)
    try:
        if n.managed:
            args = ["address", host_mac(n.mac)] + (["master", bridge] if bridge else [])
            _ip(host, "link", "set", "dev", tap.name, *args, "up")
        if n.model == "virtio" and os.path.exists(VHOST_DEVICE):
            with contextlib.suppress(OSError):  # no vhost-net for this user: QEMU's own
                tap.vhostfd = os.open(VHOST_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except BaseException:
        tap.close()
        raise
    log.info("tap %s for %s on bridge %s (vhost %s)", tap.name, n.mac, bridge or "-",
             tap.vhostfd is not None)
    return tap


def _ip(host: str, *args: str) -> None:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FerryError(f"ip {' '.join(args)} failed: {exc}",
                         host=host) from None
    if done.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)} failed: {done.stderr.strip()}", host=host)
