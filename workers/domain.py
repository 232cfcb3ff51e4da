"""The domain model: a documented subset of libvirt's domain XML, validated on construction.

The model knows no XML: workers/domain_xml.py reads and writes it.

Why a subset: both ends of a migration must start identical QEMU device
trees, so ferry accepts only what it turns into a deterministic command line
and refuses everything else by name instead of silently dropping a device.

Safety: the text must be UTF-8 without NUL, at most 1 MiB; any ``<!DOCTYPE``
or ``<!ENTITY`` (even in a comment) is refused before lxml sees it, because
libxml2 expands entities in attribute values even with resolve_entities=False.

Decisions (libvirt's behaviour unless noted; the whole subset: docs/domain.md):

- Accepted and ignored (real libvirt writes them; they change nothing ferry
  starts): ``<metadata>``, ``<resource>``, ``<seclabel>``, ``<smbios
  mode='emulate'>``, ``<alias>`` (aliases are derived from
  the XML, see `Disk.alias`), ``<address>`` other than PCI, ``<backingStore>``,
  spice ``<image>``, memballoon ``<stats>``.  Unknown attributes of known
  elements are ignored, except guest-visible ones ferry does not model (see
  docs/domain.md).
- Refused by name (UnsupportedError): every other element, e.g. ``<sound>``,
  ``<hostdev>``, disk bus usb, ``<qemu:env>``.
- Disks: vdX on virtio, sdX on scsi (virtio-scsi only), hda-hdd on ide (pc),
  sda-sdf on sata (q35's AHCI).  A
  cdrom is read-only; a shareable writable disk must be raw.  Serial ports 0-3
  (isa-serial); the only console is the serial console on port 0, mirroring
  serial 0 (created from the console when missing).  At most one ``<video>``,
  none added by default; a missing ``<memballoon>`` means virtio.  USB inputs
  and channels bring their controller (written into the definition, as libvirt
  does).
- Runtime values (pty paths, autoport-assigned ports, kernel-named vnetN taps,
  host-picked channel sockets) are read only by
  ``parse_domain_xml(live=True)`` and written only by
  ``format_domain_xml(live=True)`` (with aliases), so
  ``parse_domain_xml(format_domain_xml(d)) == d`` for a definition and the same
  with ``live=True`` on both sides for a running guest.  ``migratable=True``
  gives the inactive XML (ferry adds no implicit devices for it to strip);
  ``secure=False`` drops graphics passwords.
"""

from __future__ import annotations

import ipaddress
import os
import re
import uuid as uuidlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from workers.devices import (
    Audio,
    Channel,
    Controller,
    CpuFeature,
    DriveAddress,
    Firmware,
    Input,
    Interface,
    NumaCell,
    PciAddress,
    Rng,
    Topology,
    Video,
    Watchdog,
    format_cpuset,
    machine_family,
)
from workers.errors import InvalidInputError, UnsupportedError, one_line

DEFAULT_EMULATOR = "/usr/bin/qemu-system-x86_64"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
_IDENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # machine and CPU model names
_TARGET_RE = {"virtio": re.compile(r"vd[a-z]{1,2}"), "ide": re.compile(r"hd[a-d]"),
              "sata": re.compile(r"sd[a-f]"), "scsi": re.compile(r"sd[a-z]{1,2}")}
FEATURES = ("acpi", "apic", "pae")
_ACTIONS = ("destroy", "restart", "preserve", "rename-restart")
_CACHES = (None, "default", "none", "writethrough", "writeback", "directsync", "unsafe")
_TIMERS = ("platform", "pit", "rtc", "hpet", "tsc", "kvmclock", "hypervclock")
# Per timer, the present and tickpolicy values ferry turns into QEMU options or that
# are QEMU's default (rtc catchup: driftfix=slew; hpet, kvmclock present='no'); any
# other would be dropped, so it is refused.
_TIMER_VALUES: dict[str, tuple[tuple[bool | None, ...], tuple[str | None, ...]]] = {
    "rtc": ((None, True), (None, "delay", "catchup")), "pit": ((None, True), (None, "delay")),
    "hpet": ((None, True, False), (None,)), "kvmclock": ((None, True, False), (None,)),
    "tsc": ((None, True), (None,)), "platform": ((None, True), (None,)),
    "hypervclock": ((None, False), (None,))}
Enums = tuple[str, Any, Sequence[Any]]


def check(ok: bool, message: str, exc: type[InvalidInputError] = InvalidInputError) -> None:
    if not ok:
        raise exc(one_line(message))


def check_enums(where: str, *checks: Enums) -> None:
    """Each (xml name, value, allowed values) must hold; None in `allowed` makes it optional."""
    for what, value, allowed in checks:
        shown = ", ".join(str(a) for a in allowed if a is not None)
        check(value in allowed, f"{where}{what} {value!r} is not one of {shown}")


def _abspath(path: str | None, what: str) -> None:
    ok = path is not None and path.startswith("/") and not re.search(r"[\x00-\x1f]", path)
    check(ok, f"{what} {path!r} must be an absolute path without control characters")


@dataclass(frozen=True, kw_only=True)
class Disk:
    """A disk or cdrom on a file or a block device (`kind`); `alias` names it identically
    on both hosts.  Host-side only: source, cache, io, discard, detect_zeroes,
    error_policy."""

    target: str
    bus: str
    source: str | None
    kind: str = "file"
    device: str = "disk"
    format: str = "raw"
    cache: str | None = None
    io: str | None = None
    discard: str | None = None
    detect_zeroes: str | None = None
    error_policy: str | None = None
    readonly: bool = False
    shareable: bool = False
    serial: str | None = None
    boot_order: int | None = None
    address: PciAddress | None = None
    drive: DriveAddress | None = None  # scsi: controller, bus, target, unit

    def __post_init__(self) -> None:
        where = f"disk {self.target!r} "
        check_enums(where, ("device", self.device, ("disk", "cdrom")))
        bad_bus = f"{where}bus {self.bus!r} is not supported (virtio, scsi, ide or sata)"
        check(self.bus in ("virtio", "scsi", "ide", "sata"), bad_bus, UnsupportedError)
        fits = bool(_TARGET_RE[self.bus].fullmatch(self.target))
        check(fits, f"disk target dev {self.target!r} does not fit bus {self.bus!r} "
              "(vdX, sdX, hda-hdd, sda-sdf)")
        if self.bus != "scsi":
            object.__setattr__(self, "drive", None)  # ide and sata: the target dev says it
        elif self.drive is None:  # libvirt's default: 7 units per controller
            object.__setattr__(self, "drive", DriveAddress(controller=self.index // 7,
                                                           unit=self.index % 7))
        check(self.kind in ("file", "block"),
              f"disk type {self.kind!r} is not supported (file or block)", UnsupportedError)
        check_enums(
            where,
            ("driver type", self.format, ("raw", "qcow2")),
            ("driver cache", self.cache, _CACHES),
            ("driver io", self.io, (None, "native", "threads", "io_uring")),
            ("driver discard", self.discard, (None, "unmap", "ignore")),
            ("driver detect_zeroes", self.detect_zeroes, (None, "off", "on", "unmap")),
            ("driver error_policy", self.error_policy, (None, "stop", "report", "ignore",
                                                        "enospace")),
        )
        check(self.serial is None or bool(re.fullmatch(r"[A-Za-z0-9_.+ -]{1,20}", self.serial)),
              f"{where}serial {self.serial!r} is not 1-20 of A-Za-z0-9_.+- and space")
        check(self.address is None or self.bus == "virtio",
              f"{where}a pci address is for bus 'virtio' only")
        if self.device == "cdrom":
            check(self.bus in ("ide", "sata", "scsi"), f"{where}cdrom needs bus 'ide', "
                  "'sata' or 'scsi'", UnsupportedError)
            object.__setattr__(self, "readonly", True)
        if self.source is not None or self.device == "disk":
            _abspath(self.source, f"{where}source {'dev' if self.kind == 'block' else 'file'}")
        rw_qcow2 = self.shareable and self.format == "qcow2" and not self.readonly
        check(not rw_qcow2, f"{where}shareable and writable must be raw", UnsupportedError)
        check((self.boot_order or 1) >= 1, f"{where}boot order {self.boot_order} is not >= 1")

    @property
    def index(self) -> int:
        """vda=0, vdz=25, vdaa=26: libvirt's virDiskNameToIndex."""
        n = 0
        for ch in self.target[2:]:
            n = n * 26 + ord(ch) - ord("a") + 1
        return n - 1

    @property
    def alias(self) -> str:
        """libvirt's alias: virtio-disk0, ide0-1-0 (IDE bus 1, unit 0), sata0-0-2 (port 2),
        scsi0-0-0-1 (controller, bus, target, unit)."""
        i = self.index
        if self.drive is not None:
            a = self.drive
            return f"scsi{a.controller}-{a.bus}-{a.target}-{a.unit}"
        if self.bus == "sata":
            return f"sata0-0-{i}"
        return f"virtio-disk{i}" if self.bus == "virtio" else f"ide0-{i // 2}-{i % 2}"

    @property
    def device_id(self) -> str:
        """The QEMU -device id (query-block's ``qdev`` for IDE)."""
        return self.alias

    @property
    def drive_id(self) -> str:
        """The QEMU -drive id (query-block's ``device``)."""
        return f"drive-{self.alias}"


@dataclass(frozen=True, kw_only=True)
class Serial:
    """An isa-serial port; a pty's `path` is its runtime /dev/pts path (live only)."""

    type: str
    port: int
    path: str | None = None
    mode: str | None = None  # unix: bind (QEMU listens) | connect
    append: bool | None = None  # file

    def __post_init__(self) -> None:
        check_enums("serial ", ("type", self.type, ("pty", "file", "unix")))
        check(0 <= self.port <= 3, f"serial target port {self.port} is not in 0-3")
        if self.type != "pty" or self.path is not None:
            _abspath(self.path, f"serial {self.type} source path")
        modes = ("bind", "connect") if self.type == "unix" else (None,)
        check_enums("serial ", ("source mode", self.mode, modes))

    @property
    def alias(self) -> str:
        return f"serial{self.port}"

    @property
    def chardev_id(self) -> str:
        return f"charserial{self.port}"


@dataclass(frozen=True, kw_only=True)
class Console:
    """The serial console: mirrors serial port 0 and adds no device."""

    target_type: str = "serial"
    port: int = 0


@dataclass(frozen=True, kw_only=True)
class Graphics:
    """A VNC or SPICE display; `port` stays None until autoport assigns one."""

    type: str
    port: int | None = None
    autoport: bool = True
    tls_port: int | None = None
    listen: str | None = None
    passwd: str | None = field(default=None, repr=False)  # never in logs

    def __post_init__(self) -> None:
        check_enums("graphics ", ("type", self.type, ("vnc", "spice")))
        low = 5900 if self.type == "vnc" else 1
        for what, port in (("port", self.port), ("tlsPort", self.tls_port)):
            check(port is None or low <= port <= 65535, f"graphics {what} {port} is out of range")
        check(self.tls_port is None or self.type == "spice", "graphics tlsPort is for spice only")
        check(self.tls_port is None, "graphics spice tlsPort is not supported (no TLS "
              "certificates for SPICE)", UnsupportedError)
        check(self.autoport or self.port is not None, "graphics needs a port or autoport='yes'")
        try:
            _ = self.listen is None or ipaddress.ip_address(self.listen)
        except ValueError:
            msg = f"graphics listen address {self.listen!r} is not an IP address"
            raise UnsupportedError(one_line(msg)) from None


@dataclass(frozen=True, kw_only=True)
class Timer:
    """A `<clock><timer>`: kept for the XML; hpet and rtc also shape the command line."""

    name: str
    tickpolicy: str | None = None
    present: bool | None = None

    def __post_init__(self) -> None:
        policies = (None, "delay", "catchup", "merge", "discard")
        check_enums(
            "clock timer ", ("name", self.name, _TIMERS), ("tickpolicy", self.tickpolicy, policies)
        )
        presents, acted = _TIMER_VALUES[self.name]
        check(self.present in presents, f"clock timer {self.name} present="
              f"'{'yes' if self.present else 'no'}' is not supported", UnsupportedError)
        check(self.tickpolicy in acted, f"clock timer {self.name} tickpolicy="
              f"{self.tickpolicy!r} is not supported", UnsupportedError)


@dataclass(frozen=True, kw_only=True)
class DomainDef:
    """A guest definition, validated on construction so `replace` cannot smuggle bad values."""

    name: str
    uuid: str
    type: str = "kvm"
    memory_kib: int
    current_memory_kib: int | None = None  # None: equal to memory_kib
    vcpus: int = 1
    vcpus_current: int | None = None
    title: str | None = None
    description: str | None = None
    arch: str = "x86_64"
    machine: str = "pc"
    os_type: str = "hvm"
    boot_devices: tuple[str, ...] = ("hd",)
    kernel: str | None = None  # direct kernel boot: <os><kernel>, <initrd>, <cmdline>
    initrd: str | None = None
    cmdline: str | None = None
    firmware: Firmware | None = None
    features: tuple[str, ...] = ()
    vmport: bool | None = None  # <features><vmport state>: None is QEMU's default (on)
    boot_menu: bool | None = None  # <os><bootmenu enable timeout>: firmware, not ABI
    boot_menu_timeout_ms: int | None = None
    suspend_to_mem: bool | None = None  # <pm>: ACPI S3 and S4 (None: QEMU's default, on)
    suspend_to_disk: bool | None = None
    cpu_mode: str | None = None
    cpu_model: str | None = None
    cpu_features: tuple[CpuFeature, ...] = ()
    cpu_topology: Topology | None = None
    numa: tuple[NumaCell, ...] = ()
    clock_offset: str = "utc"
    timers: tuple[Timer, ...] = ()
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    emulator: str = DEFAULT_EMULATOR
    disks: tuple[Disk, ...] = ()
    serials: tuple[Serial, ...] = ()
    consoles: tuple[Console, ...] = ()
    graphics: tuple[Graphics, ...] = ()
    videos: tuple[Video, ...] = ()
    memballoon: str = "virtio"
    memballoon_address: PciAddress | None = None
    interfaces: tuple[Interface, ...] = ()
    channels: tuple[Channel, ...] = ()
    inputs: tuple[Input, ...] = ()
    controllers: tuple[Controller, ...] = ()
    rngs: tuple[Rng, ...] = ()
    watchdogs: tuple[Watchdog, ...] = ()
    audios: tuple[Audio, ...] = ()
    qemu_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        fix = object.__setattr__
        ok_name = bool(_NAME_RE.fullmatch(self.name)) and ".." not in self.name
        check(ok_name, f"domain <name> {self.name!r} is invalid (1-64 of A-Za-z0-9_.+-, no '..')")
        try:
            fix(self, "uuid", str(uuidlib.UUID(self.uuid)))
        except (ValueError, TypeError, AttributeError):
            bad = one_line(f"domain <uuid> {self.uuid!r} is not a valid UUID")
            raise InvalidInputError(bad) from None
        for what, value, allowed in (
            ("domain type", self.type, ("kvm", "qemu")),
            ("os arch", self.arch, ("x86_64",)),
            ("os type", self.os_type, ("hvm",)),
            ("clock offset", self.clock_offset, ("utc", "localtime")),
        ):
            check(value in allowed, f"{what} {value!r} is not supported", UnsupportedError)
        check(self.memory_kib > 0, f"<memory> {self.memory_kib} KiB must be greater than 0")
        fix(self, "current_memory_kib", self.current_memory_kib or self.memory_kib)
        cur = self.current_memory_kib or 0
        check(0 < cur <= self.memory_kib, f"<currentMemory> {cur} KiB is not in 1..<memory>")
        check(1 <= self.vcpus <= 255, f"<vcpu> {self.vcpus} is not in 1-255")
        fix(self, "vcpus_current", None if self.vcpus_current == self.vcpus else self.vcpus_current)
        now = self.vcpus_current
        check(
            now is None or 1 <= now <= self.vcpus, f"<vcpu> current {now} not in 1..{self.vcpus}"
        )
        check("\n" not in (self.title or ""), "domain <title> must be one line")
        check(bool(_IDENT_RE.fullmatch(self.machine)), f"os machine {self.machine!r} is invalid")
        machine_family(self.machine)
        check_enums("", *(("feature", f, FEATURES) for f in self.features))
        fix(self, "features", tuple(f for f in FEATURES if f in self.features))
        model_ok = (self.cpu_mode == "custom") == bool(self.cpu_model) and bool(
            _IDENT_RE.fullmatch(self.cpu_model or "x")
        )
        check(model_ok, f"cpu model {self.cpu_model!r} is invalid for mode {self.cpu_mode!r}")
        self._check_boot()
        self._check_cpu()
        check_enums(
            "",
            *(("os boot dev", dev, ("hd", "cdrom", "network", "fd")) for dev in self.boot_devices),
            ("cpu mode", self.cpu_mode, (None, "host-passthrough", "host-model", "custom")),
            ("<on_poweroff>", self.on_poweroff, _ACTIONS),
            ("<on_reboot>", self.on_reboot, _ACTIONS),
            ("<on_crash>", self.on_crash, (*_ACTIONS, "coredump-destroy", "coredump-restart")),
            ("memballoon model", self.memballoon, ("virtio", "none")),
        )
        base = os.path.basename(self.emulator)
        _abspath(self.emulator, "<emulator>")
        check(
            base.startswith("qemu-system-") or base == "qemu-kvm",
            f"<emulator> {self.emulator!r} is not a qemu-system-* or qemu-kvm binary",
        )
        self._check_devices()

    def _check_boot(self) -> None:
        wait = self.boot_menu_timeout_ms
        check(wait is None or 0 <= wait <= 65535,
              f"os bootmenu timeout {wait} is not in 0-65535 (ms)")
        for what in ("kernel", "initrd"):
            if getattr(self, what) is not None:
                _abspath(getattr(self, what), f"os {what}")
        check(self.kernel is not None or (self.initrd is None and self.cmdline is None),
              "os initrd and cmdline need an os kernel")
        check(not re.search(r"[\x00-\x1f]", self.cmdline or ""),
              "os cmdline contains control characters")

    def _check_cpu(self) -> None:
        names = [f.name for f in self.cpu_features]
        dup = sorted({n for n in names if names.count(n) > 1})
        check(not dup, f"duplicate cpu feature {', '.join(dup)}")
        check(not self.cpu_features or self.cpu_mode in ("custom", "host-model"),
              f"cpu features need mode 'custom' or 'host-model', not {self.cpu_mode!r}",
              UnsupportedError)
        top = self.cpu_topology
        check(top is None or top.vcpus == self.vcpus,
              f"cpu topology gives {top.vcpus if top else 0} vcpus, <vcpu> is {self.vcpus}")
        if self.numa:
            self._check_numa()

    def _check_numa(self) -> None:
        """QEMU's and libvirt's rules: cells 0..N-1 in order, every vCPU in exactly one,
        memory the cells' sum, distances to cells that exist, both ways or one."""
        ids = [c.id for c in self.numa]
        check(ids == list(range(len(ids))), f"cpu numa cell ids {ids} are not 0..N-1 in order")
        cpus = [cpu for c in self.numa for cpu in c.cpus]
        dup = tuple(sorted(c for c, n in Counter(cpus).items() if n > 1))
        check(not dup, f"cpu numa: vcpus {','.join(format_cpuset(dup))} are in more than "
              "one cell")
        outside = tuple(sorted(set(cpus) - set(range(self.vcpus))))
        check(not outside, f"cpu numa: vcpus {','.join(format_cpuset(outside))} are beyond "
              f"<vcpu> {self.vcpus}")
        missing = tuple(sorted(set(range(self.vcpus)) - set(cpus)))
        check(not missing, f"cpu numa: vcpus {','.join(format_cpuset(missing))} are in no "
              "cell")
        total = sum(c.memory_kib for c in self.numa)
        check(total == self.memory_kib, f"cpu numa cells add up to {total} KiB, <memory> is "
              f"{self.memory_kib} KiB")
        dist = {(c.id, s): v for c in self.numa for s, v in c.distances}
        check(all(s in ids for _, s in dist), "cpu numa distances name a cell that does not "
              "exist")
        if dist:
            lacking = [f"{a}-{b}" for a in ids for b in ids
                       if a < b and (a, b) not in dist and (b, a) not in dist]
            check(not lacking, f"cpu numa distances between cells {', '.join(lacking)} are "
                  "missing (give every pair, one way at least)")

    @property
    def family(self) -> str:
        """The machine family: 'pc' (i440fx) or 'q35'."""
        return machine_family(self.machine)

    def _fill_controllers(self) -> None:
        """libvirt's implicit controllers, written into the definition: a USB controller of
        the machine's default model for USB inputs, virtio-serial for channels."""
        default_usb = "qemu-xhci" if self.family == "q35" else "piix3-uhci"
        ctrls = [replace(c, model=default_usb) if c.type == "usb" and c.model is None else c
                 for c in self.controllers]
        if any(i.bus == "usb" for i in self.inputs) and not any(c.type == "usb" for c in ctrls):
            ctrls.append(Controller(type="usb", model=default_usb))
        if self.channels and not any(c.type == "virtio-serial" for c in ctrls):
            ctrls.append(Controller(type="virtio-serial"))
        scsi = {c.index for c in ctrls if c.type == "scsi"}
        for index in sorted({d.drive.controller for d in self.disks if d.drive} - scsi):
            ctrls.append(Controller(type="scsi", index=index, model="virtio-scsi"))
        object.__setattr__(self, "controllers", tuple(ctrls))

    def _check_devices(self) -> None:
        self._fill_controllers()
        boots = [d.boot_order for d in self.disks if d.boot_order is not None]
        boots += [n.boot_order for n in self.interfaces if n.boot_order is not None]
        keyed: tuple[tuple[str, list[Any]], ...] = (
            ("disk target dev", [d.target for d in self.disks]),
            ("disk drive address", [str(d.drive) for d in self.disks if d.drive]),
            ("serial target port", [s.port for s in self.serials]),
            ("boot order", boots),
            ("graphics type", [g.type for g in self.graphics]),
            ("interface mac address", [n.mac for n in self.interfaces]),
            ("interface target dev", [n.target_dev for n in self.interfaces if n.target_dev]),
            ("channel target name", [c.name for c in self.channels]),
            ("channel port", [c.port for c in self.channels]),
            ("controller", [f"{c.type} {c.index}" for c in self.controllers]),
            ("pci address", [str(a) for a in self.pci_addresses()]),
            ("audio id", [a.id for a in self.audios]),
        )
        for what, keys in keyed:  # Counter: 18,000 disks fit in 1 MiB, keys.count() is quadratic
            dup = sorted({str(k) for k, n in Counter(keys).items() if n > 1})
            check(not dup, f"duplicate {what} {', '.join(dup)}")
        check(not (boots and self.boot_devices), "<boot order> cannot mix with <os><boot dev>")
        for con in self.consoles:
            only = f"console target {con.target_type!r} port {con.port} is not supported (serial 0)"
            check((con.target_type, con.port) == ("serial", 0), only, UnsupportedError)
            check(any(s.port == 0 for s in self.serials), "the serial console needs serial 0")
        check(len(self.consoles) <= 1, "only one <console> is supported", UnsupportedError)
        check(len(self.videos) <= 1, "only one <video> is supported", UnsupportedError)
        check(all("\x00" not in a for a in self.qemu_args), "qemu:arg value contains NUL")
        check(len(self.rngs) <= 1, "only one <rng> is supported", UnsupportedError)
        check(len(self.watchdogs) <= 1, "only one <watchdog> is supported", UnsupportedError)
        self._check_buses()

    def _check_buses(self) -> None:
        q35 = self.family == "q35"
        for disk in self.disks:
            ok = disk.bus in ("virtio", "scsi") or (disk.bus == "sata") == q35
            check(ok, f"disk {disk.target!r} bus {disk.bus!r} does not exist on machine "
                  f"{self.machine!r} (pc has ide, q35 has sata)", UnsupportedError)
        for c in self.controllers:
            pc_only = c.type == "ide" or c.model == "pci-root"
            q35_only = c.type == "sata" or c.model in ("pcie-root", "pcie-root-port")
            check(not (pc_only and q35) and not (q35_only and not q35),
                  f"controller {c.type} {c.model or ''} does not fit machine {self.machine!r}",
                  UnsupportedError)
        usb = [c for c in self.controllers if c.type == "usb" and c.model != "none"]
        for i in self.inputs:
            check(i.bus != "usb" or bool(usb), f"input {i.type} bus 'usb' needs a USB "
                  "controller (this one's model is 'none')")
        buses = {0} | {c.index for c in self.controllers if c.model == "pcie-root-port"}
        for a in self.pci_addresses():
            check(a.bus in buses, f"pci address {a} is on bus {a.bus}, which no "
                  "pcie-root-port controller of that index makes")
        check(not any(c.type == "spicevmc" for c in self.channels) or
              any(g.type == "spice" for g in self.graphics),
              "a spicevmc channel needs spice graphics")

    def pci_addresses(self) -> list[PciAddress]:
        """The explicit PCI addresses of every device, in the definition's order."""
        found = [c.address for c in self.controllers] + [v.address for v in self.videos]
        found += [d.address for d in self.disks] + [n.address for n in self.interfaces]
        found += [r.address for r in self.rngs] + [w.address for w in self.watchdogs]
        found.append(self.memballoon_address)
        return [a for a in found if a is not None]

    def inactive(self) -> DomainDef:
        """This definition without runtime values (pty paths, autoport-assigned ports,
        kernel-named taps, host-picked channel sockets)."""
        return replace(
            self,
            serials=tuple(replace(s, path=None) if s.type == "pty" else s for s in self.serials),
            graphics=tuple(replace(g, port=None) if g.autoport else g for g in self.graphics),
            interfaces=tuple(replace(n, target_dev=None) if auto_tap_name(n.target_dev) else n
                             for n in self.interfaces),
            channels=tuple(replace(c, path=None) if auto_channel_path(c.path) else c
                           for c in self.channels),
        )


AUTO_CHANNEL_DIR = "ferry-channel"  # sockets the host picked live in a directory of this name


def auto_channel_path(path: str | None) -> bool:
    """A channel socket the host picked (libvirt's rule for its channel directory)."""
    return path is not None and f"/{AUTO_CHANNEL_DIR}/" in path


def auto_tap_name(name: str | None) -> bool:
    """libvirt's rule: vnet* (and macvtap*) tap names are the host's, not the user's."""
    return name is not None and name.startswith(("vnet", "macvtap"))


def writable_disks(d: DomainDef) -> tuple[Disk, ...]:
    """Disks the guest writes and nobody shares: what the lock manager leases."""
    return tuple(x for x in d.disks if not x.readonly and not x.shareable and x.source)


def with_graphics_ports(d: DomainDef, ports: Sequence[int]) -> DomainDef:
    """Fill the autoport graphics' ports, in order (the agent picks them from its range)."""
    auto = [i for i, g in enumerate(d.graphics) if g.autoport]
    if len(ports) != len(auto):
        raise ValueError(f"{len(auto)} autoport graphics but {len(ports)} ports")
    port = dict(zip(auto, ports, strict=True))
    new = (replace(g, port=port[i]) if i in port else g for i, g in enumerate(d.graphics))
    return replace(d, graphics=tuple(new))


def with_pty_paths(d: DomainDef, paths: Mapping[str, str]) -> DomainDef:
    """Record the pty paths QEMU reported (query-chardev), keyed by chardev id."""
    new = (
        replace(s, path=paths[s.chardev_id]) if s.type == "pty" and s.chardev_id in paths else s
        for s in d.serials
    )
    return replace(d, serials=tuple(new))


def serial_log_paths(d: DomainDef) -> tuple[str, ...]:
    """Files the guest's serial output goes to (the agent tails them)."""
    return tuple(s.path for s in d.serials if s.type == "file" and s.path)


def with_channel_paths(d: DomainDef, run_dir: str) -> DomainDef:
    """Give every unix channel without a path a socket in `run_dir`/ferry-channel."""
    new = (replace(c, path=f"{run_dir}/{AUTO_CHANNEL_DIR}/{d.uuid}.{c.port}")
           if c.type == "unix" and c.path is None else c for c in d.channels)
    return replace(d, channels=tuple(new))


def with_tap_names(d: DomainDef, names: Mapping[int, str]) -> DomainDef:
    """Record the tap names the kernel gave, keyed by interface index."""
    new = (replace(n, target_dev=names[i]) if i in names else n
           for i, n in enumerate(d.interfaces))
    return replace(d, interfaces=tuple(new))
