"""The devices of a server guest beyond disks and serial ports: NICs, channels, inputs,
controllers, video, rng, watchdog, audio, firmware and the guest CPU.

Like workers/domain.py, each class validates on construction and knows no XML
(workers/devices_xml.py reads and writes them).  Every field that the guest can
see is compared by the ABI check (workers/abi.py); the few that only the host
sees (a bridge name, a socket path, an rng's rate) say so in their comment.

Why PCI addresses are kept: libvirt writes an ``<address type='pci'>`` for every
PCI device and the guest sees them (a NIC's name in the guest follows its slot),
so ferry places a device where its address says and refuses a target definition
that moves it.  A device without an address is placed by QEMU in the fixed order
of workers/qemu_argv.py, the same on both hosts.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass

from workers.errors import InvalidInputError, UnsupportedError


def check(ok: bool, message: str, exc: type[InvalidInputError] = InvalidInputError) -> None:
    if not ok:
        raise exc(message)


def one_of(where: str, what: str, value: object, allowed: tuple[object, ...],
           exc: type[InvalidInputError] = InvalidInputError) -> None:
    shown = ", ".join(str(a) for a in allowed if a is not None)
    check(value in allowed, f"{where}{what} {value!r} is not one of {shown}", exc)


def abspath(path: str | None, what: str) -> None:
    ok = path is not None and path.startswith("/") and not re.search(r"[\x00-\x1f]", path)
    check(ok, f"{what} {path!r} must be an absolute path without control characters")


_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # IFNAMSIZ - 1
_CHANNEL_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_FEATURE_RE = re.compile(r"[a-z0-9_.-]{1,32}")
MACHINES_Q35 = re.compile(r"q35|pc-q35-[0-9.]+")
MACHINES_PC = re.compile(r"pc|pc-i440fx-[0-9.]+")


def machine_family(machine: str) -> str:
    """'q35' or 'pc'; any other machine type is refused by name."""
    if MACHINES_Q35.fullmatch(machine):
        return "q35"
    if MACHINES_PC.fullmatch(machine):
        return "pc"
    raise UnsupportedError(f"os machine {machine!r} is not supported (pc, pc-i440fx-*, q35, "
                           "pc-q35-*)")


def random_mac() -> str:
    """libvirt's default: QEMU's OUI 52:54:00 and three random bytes."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


@dataclass(frozen=True, kw_only=True)
class PciAddress:
    """``<address type='pci'>``: bus 0 is the root bus, bus N the controller of index N."""

    bus: int
    slot: int
    function: int = 0
    multifunction: bool = False

    def __post_init__(self) -> None:
        ok = 0 <= self.bus <= 255 and 0 <= self.slot <= 31 and 0 <= self.function <= 7
        check(ok, f"pci address {self} is out of range (bus 0-255, slot 0-31, function 0-7)")

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.slot:02x}.{self.function}"


@dataclass(frozen=True, kw_only=True)
class DriveAddress:
    """``<address type='drive'>`` of a SCSI disk: virtio-scsi controller `controller`
    (by index), its only bus 0, target (scsi-id) and unit (lun), all guest-visible."""

    controller: int = 0
    bus: int = 0
    target: int = 0
    unit: int = 0

    def __post_init__(self) -> None:
        ok = 0 <= self.controller <= 31 and 0 <= self.target <= 255 and 0 <= self.unit <= 16383
        check(ok, f"drive address {self} is out of range (controller 0-31, target 0-255, "
              "unit 0-16383)")
        check(self.bus == 0, f"drive address {self}: virtio-scsi has bus 0 only",
              UnsupportedError)

    def __str__(self) -> str:
        return f"{self.controller}:{self.bus}:{self.target}:{self.unit}"


@dataclass(frozen=True, kw_only=True)
class PortForward:
    """libvirt's ``<portForward>`` on a user-mode NIC: host `address`:`start` to guest `to`.

    The host address defaults to loopback (libvirt's passt default is every address;
    ferry will not open a guest port to the network unless told)."""

    proto: str = "tcp"
    address: str = "127.0.0.1"
    start: int
    to: int

    def __post_init__(self) -> None:
        one_of("interface portForward ", "proto", self.proto, ("tcp", "udp"))
        ok = 1 <= self.start <= 65535 and 1 <= self.to <= 65535
        check(ok, f"interface portForward range {self.start}->{self.to} is out of 1-65535")
        check(bool(re.fullmatch(r"[0-9.]{7,15}", self.address)),
              f"interface portForward address {self.address!r} is not an IPv4 address")


NIC_TYPES = ("bridge", "network", "ethernet", "user", "direct")
NIC_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e",
              "rtl8139": "rtl8139"}


@dataclass(frozen=True, kw_only=True)
class Interface:
    """A NIC.  `source` is the bridge (type bridge), the network name (type network,
    mapped to a bridge by the host's FERRY_NETWORKS), the macvtap's parent device
    (type direct, `source_mode` bridge only) or None; `target_dev` the tap (or macvtap):
    the user's name, or on a running guest the name the kernel gave (vnetN; libvirt
    drops vnet* names from inactive XML, and so does ferry).  `managed=False` (type
    ethernet, ``<target managed='no'>``) uses a tap someone else made.  Host-side
    only: source, source_mode, target_dev, managed."""

    type: str
    mac: str
    model: str = "virtio"
    source: str | None = None
    source_mode: str | None = None  # direct: the macvtap mode
    target_dev: str | None = None
    managed: bool = True
    boot_order: int | None = None
    port_forwards: tuple[PortForward, ...] = ()
    address: PciAddress | None = None

    def __post_init__(self) -> None:
        where = f"interface {self.mac} "
        one_of("interface ", "type", self.type, NIC_TYPES, UnsupportedError)
        check(bool(_MAC_RE.fullmatch(self.mac)), f"interface mac address {self.mac!r} is invalid")
        check(not int(self.mac[:2], 16) & 1, f"{where}is a multicast address")
        one_of(where, "model type", self.model, tuple(NIC_MODELS), UnsupportedError)
        needs_source = self.type in ("bridge", "network", "direct")
        attr = "dev" if self.type == "direct" else self.type
        check(not needs_source or bool(self.source),
              f"interface type {self.type!r} needs a <source {attr}=...>")
        if self.type == "direct":  # libvirt's default mode is vepa
            check(self.source_mode == "bridge", f"{where}direct source mode "
                  f"{self.source_mode or 'vepa'!r} is not supported (bridge)", UnsupportedError)
        else:
            object.__setattr__(self, "source_mode", None)
        check(self.source is None or bool(_IFNAME_RE.fullmatch(self.source)),
              f"{where}source {self.source!r} is not a valid bridge, network or device name")
        check(self.target_dev is None or bool(_IFNAME_RE.fullmatch(self.target_dev)),
              f"{where}target dev {self.target_dev!r} is not a valid interface name")
        check(self.managed or (self.type == "ethernet" and self.target_dev is not None),
              f"{where}target managed='no' needs type 'ethernet' and a target dev")
        check(not self.port_forwards or self.type == "user",
              f"{where}portForward is for type 'user' only")
        check((self.boot_order or 1) >= 1, f"{where}boot order {self.boot_order} is not >= 1")

    @property
    def tap(self) -> bool:
        return self.type != "user"


@dataclass(frozen=True, kw_only=True)
class Channel:
    """A virtio-serial port: the guest agent's (type unix, `path` host-side; None until
    the host picks one) or SPICE's vdagent (type spicevmc)."""

    type: str
    name: str
    path: str | None = None
    port: int = 1  # virtio-serial port number (nr), guest-visible

    def __post_init__(self) -> None:
        one_of("channel ", "type", self.type, ("unix", "spicevmc"), UnsupportedError)
        check(bool(_CHANNEL_RE.fullmatch(self.name)), f"channel target name {self.name!r} "
              "is invalid")
        if self.path is not None:
            abspath(self.path, f"channel {self.name} source path")
        check(1 <= self.port <= 30, f"channel {self.name} port {self.port} is not in 1-30")


INPUT_TYPES = ("tablet", "mouse", "keyboard")


@dataclass(frozen=True, kw_only=True)
class Input:
    """A tablet, mouse or keyboard; ps2 ones are built into the machine (no device)."""

    type: str
    bus: str

    def __post_init__(self) -> None:
        one_of("input ", "type", self.type, INPUT_TYPES, UnsupportedError)
        buses = ("usb", "virtio") if self.type == "tablet" else ("ps2", "usb", "virtio")
        one_of(f"input {self.type} ", "bus", self.bus, buses, UnsupportedError)


USB_MODELS = {"piix3-uhci": "piix3-usb-uhci", "ich9-ehci1": "ich9-usb-ehci1",
              "qemu-xhci": "qemu-xhci", "nec-xhci": "nec-usb-xhci", "none": ""}
PCI_MODELS = ("pci-root", "pcie-root", "pcie-root-port")
# libvirt wrote Intel's ioh3420 for q35 root ports until QEMU had its generic one (2017):
# long-lived guests still carry it, and it is guest-visible (another PCI id)
ROOT_PORT_DEVICES = ("pcie-root-port", "ioh3420")


@dataclass(frozen=True, kw_only=True)
class Controller:
    """usb, pci (root and root ports), virtio-serial, virtio-scsi, and the built-in ide
    (pc) and sata (q35) controllers, which add no device."""

    type: str
    index: int = 0
    model: str | None = None
    ports: int | None = None  # usb xhci: ports per speed; virtio-serial: max ports
    vectors: int | None = None  # virtio-serial: MSI-X vectors
    chassis: int | None = None  # pcie-root-port
    port: int | None = None  # pcie-root-port
    device: str | None = None  # pcie-root-port: libvirt's <model name>, QEMU's device
    address: PciAddress | None = None

    def __post_init__(self) -> None:
        where = f"controller {self.type} {self.index} "
        one_of("controller ", "type", self.type, ("usb", "pci", "virtio-serial", "scsi", "ide",
                                                  "sata"), UnsupportedError)
        check(0 <= self.index <= 255, f"{where}index is not in 0-255")
        models: tuple[str | None, ...] = {
            "usb": (None, *USB_MODELS), "pci": PCI_MODELS, "virtio-serial": (None,),
            "scsi": ("virtio-scsi",), "ide": (None, "piix3", "piix4"),
            "sata": (None,)}[self.type]
        if self.type == "scsi" and self.model is None:  # libvirt picks lsilogic: ferry has
            object.__setattr__(self, "model", "virtio-scsi")  # virtio-scsi only, written out
        check(self.type != "scsi" or self.index <= 31, f"{where}index is not in 0-31")
        one_of(where, "model", self.model, models, UnsupportedError)
        xhci = self.model in ("qemu-xhci", "nec-xhci") and 1 <= (self.ports or 0) <= 15
        serial = self.type == "virtio-serial" and 1 <= (self.ports or 0) <= 31
        check(self.ports is None or xhci or serial,
              f"{where}ports: 1-15 for the xhci models, 1-31 for virtio-serial")
        check(self.vectors is None or (self.type == "virtio-serial" and
                                       0 <= self.vectors <= 32),
              f"{where}vectors: 0-32, for virtio-serial only")
        if self.type in ("ide", "sata", "usb", "virtio-serial"):
            check(self.index == 0, f"{where}is not supported (index 0 only)", UnsupportedError)
        root = self.model in ("pci-root", "pcie-root")
        check(self.type != "pci" or root == (self.index == 0),
              f"controller pci {self.index} {self.model}: index 0 is the root bus and only it")
        if self.model == "pcie-root-port":
            fix = object.__setattr__
            fix(self, "device", self.device or "pcie-root-port")
            one_of(where, "model name", self.device, ROOT_PORT_DEVICES, UnsupportedError)
            fix(self, "chassis", self.index if self.chassis is None else self.chassis)
            fix(self, "port", 0x10 + self.index - 1 if self.port is None else self.port)
            check(0 <= (self.chassis or 0) <= 255 and 0 <= (self.port or 0) <= 255,
                  f"{where}target chassis/port is out of 0-255")

    @property
    def makes_device(self) -> bool:
        return (self.type, self.model) in (("virtio-serial", None), ("pci", "pcie-root-port"),
                                           ("scsi", "virtio-scsi")) \
            or (self.type == "usb" and self.model != "none")


VIDEO_MODELS = ("vga", "cirrus", "qxl", "virtio", "bochs", "none")


@dataclass(frozen=True, kw_only=True)
class Video:
    """A display adapter; sizes in KiB as libvirt writes them (vram is VGA's vgamem)."""

    model: str
    vram: int | None = None
    ram: int | None = None  # qxl
    vgamem: int | None = None  # qxl
    heads: int | None = None
    address: PciAddress | None = None

    def __post_init__(self) -> None:
        one_of("video ", "model type", self.model, VIDEO_MODELS, UnsupportedError)
        for what in ("vram", "ram", "vgamem"):
            kib = getattr(self, what)
            check(kib is None or (kib >= 1024 and kib & (kib - 1) == 0),
                  f"video {what} {kib} KiB is not a power of two of at least 1024")
        check(self.heads is None or 1 <= self.heads <= 16, f"video heads {self.heads} not in 1-16")
        qxl_only = self.ram is not None or self.vgamem is not None
        check(not qxl_only or self.model == "qxl", "video ram and vgamem are for model 'qxl'")


@dataclass(frozen=True, kw_only=True)
class Rng:
    """virtio-rng fed by a host device; the source and rate are host-side."""

    model: str = "virtio"
    source: str = "/dev/urandom"
    rate_bytes: int | None = None
    rate_period_ms: int | None = None
    address: PciAddress | None = None

    def __post_init__(self) -> None:
        one_of("rng ", "model", self.model, ("virtio",), UnsupportedError)
        one_of("rng ", "backend", self.source, ("/dev/urandom", "/dev/random", "/dev/hwrng"),
               UnsupportedError)
        check((self.rate_bytes or 1) > 0 and (self.rate_period_ms or 1) > 0,
              "rng rate bytes and period must be positive")


WATCHDOG_ACTIONS = ("reset", "shutdown", "poweroff", "pause", "none", "dump", "inject-nmi")


@dataclass(frozen=True, kw_only=True)
class Watchdog:
    """i6300esb (PCI) or ib700 (ISA); the action is host-side."""

    model: str
    action: str = "reset"
    address: PciAddress | None = None

    def __post_init__(self) -> None:
        one_of("watchdog ", "model", self.model, ("i6300esb", "ib700"), UnsupportedError)
        one_of("watchdog ", "action", self.action, WATCHDOG_ACTIONS, UnsupportedError)
        check(self.action != "dump", "watchdog action 'dump' is not supported", UnsupportedError)


@dataclass(frozen=True, kw_only=True)
class Audio:
    """libvirt writes ``<audio id='1' type='none'/>`` into most definitions; only the
    none backend is supported (no sound device is, either)."""

    id: int = 1
    type: str = "none"

    def __post_init__(self) -> None:
        one_of("audio ", "type", self.type, ("none",), UnsupportedError)
        check(1 <= self.id <= 255, f"audio id {self.id} is not in 1-255")


@dataclass(frozen=True, kw_only=True)
class Firmware:
    """UEFI: a read-only pflash `loader` and the guest's own NVRAM file (host path, on
    shared storage to migrate), made from `template` on first start."""

    loader: str
    readonly: bool = True
    type: str = "pflash"
    nvram: str | None = None
    template: str | None = None

    def __post_init__(self) -> None:
        one_of("os loader ", "type", self.type, ("pflash",), UnsupportedError)
        check(self.readonly, "os loader readonly='no' is not supported", UnsupportedError)
        abspath(self.loader, "os loader")
        for what, path in (("os nvram", self.nvram), ("os nvram template", self.template)):
            if path is not None:
                abspath(path, what)

    def default_template(self) -> str:
        """Debian's ovmf pairs OVMF_CODE*.fd with OVMF_VARS*.fd in one directory."""
        if self.template:
            return self.template
        head, base = os.path.split(self.loader)
        return os.path.join(head, base.replace("CODE", "VARS").replace("code", "vars"))


CPU_POLICIES = ("force", "require", "disable", "forbid")


@dataclass(frozen=True, kw_only=True)
class CpuFeature:
    name: str
    policy: str = "require"

    def __post_init__(self) -> None:
        check(bool(_FEATURE_RE.fullmatch(self.name)), f"cpu feature {self.name!r} is invalid")
        check(self.policy != "optional", f"cpu feature {self.name} policy 'optional' is not "
              "supported: it depends on the host, so the guest could change under migration",
              UnsupportedError)
        one_of(f"cpu feature {self.name} ", "policy", self.policy, CPU_POLICIES)

    @property
    def on(self) -> bool:
        return self.policy in ("force", "require")


@dataclass(frozen=True, kw_only=True)
class Topology:
    sockets: int
    dies: int = 1
    cores: int
    threads: int

    def __post_init__(self) -> None:
        for what in ("sockets", "dies", "cores", "threads"):
            value = getattr(self, what)
            check(1 <= value <= 255, f"cpu topology {what} {value} is not in 1-255")

    @property
    def vcpus(self) -> int:
        return self.sockets * self.dies * self.cores * self.threads


def parse_cpuset(text: str, what: str) -> tuple[int, ...]:
    """libvirt's cpuset syntax: ``0-3,^2,5`` (ranges, single CPUs, ^ excludes), sorted."""
    on: set[int] = set()
    off: set[int] = set()
    parts = text.replace(" ", "").split(",")
    check(len(parts) <= 256, f"{what} has more than 256 parts")
    for part in parts:
        m = re.fullmatch(r"(\^?)([0-9]{1,4})(?:-([0-9]{1,4}))?", part)
        check(m is not None, f"{what} {text[:40]!r} is not a cpu list (e.g. 0-3,^2,5)")
        assert m is not None
        low, high = int(m[2]), int(m[3] or m[2])
        check(low <= high <= 254, f"{what} range {part} goes down or past vcpu 254")
        (off if m[1] else on).update(range(low, high + 1))
    return tuple(sorted(on - off))


def format_cpuset(cpus: tuple[int, ...]) -> list[str]:
    """Ranges of consecutive CPUs: (0, 1, 2, 5) -> ['0-2', '5']."""
    out: list[str] = []
    for cpu in cpus:
        if out and cpu == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{cpu}"
        else:
            out.append(str(cpu))
    return out


@dataclass(frozen=True, kw_only=True)
class NumaCell:
    """A guest NUMA node (``<cpu><numa><cell>``): its vCPUs, its RAM (a
    memory-backend-ram of its own) and its distances to other nodes, all guest-visible."""

    id: int
    cpus: tuple[int, ...] = ()  # none: a memory-only node
    memory_kib: int
    distances: tuple[tuple[int, int], ...] = ()  # (sibling id, value)

    def __post_init__(self) -> None:
        where = f"cpu numa cell {self.id} "
        check(0 <= self.id <= 127, f"{where}id is not in 0-127")
        check(self.memory_kib > 0 and self.memory_kib % 1024 == 0,
              f"{where}memory {self.memory_kib} KiB is not a positive whole number of MiB")
        siblings = [s for s, _ in self.distances]
        check(len(set(siblings)) == len(siblings), f"{where}has a sibling twice in <distances>")
        for sibling, value in self.distances:
            local = sibling == self.id
            check(value == 10 if local else 10 < value <= 255,
                  f"{where}distance {value} to {sibling} is not "
                  + ("10 (its own)" if local else "in 11-255"))
