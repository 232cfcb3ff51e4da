"""The domain model: a documented subset of libvirt's domain XML, parsed safely.

Why a subset: ferry must start an identical QEMU on both ends of a migration,
so it accepts only what it can turn into a deterministic command line and
refuses everything else by name, instead of silently dropping a device.

Security: the text is checked to be UTF-8 without NUL and at most 1 MiB, and
any ``<!DOCTYPE``/``<!ENTITY`` is refused *before* lxml sees it (libxml2
expands entities in attribute values even with ``resolve_entities=False``),
even inside a comment.  The parser never resolves entities, loads DTDs or
touches the network.

Decisions (libvirt behaviour unless noted):

- Accepted and ignored, because real libvirt writes them and they do not
  change what ferry starts: ``<metadata>``, ``<resource>``, ``<seclabel>``,
  ``<bootmenu>``, the ``<vmport>`` feature, ``<address>``, ``<alias>`` (aliases
  are derived from the XML, see `Disk.alias`), ``<backingStore>``, spice
  ``<image>``, memballoon ``<stats>``, and the ``<controller>`` and ``<input>``
  devices libvirt always adds (the i440fx/q35 built-in IDE/AHCI and PS/2 are
  what ferry uses).  Unknown attributes of known elements are ignored.
- Refused by name: any other element, e.g. ``<interface>`` (UnsupportedError).
- Disk buses: virtio (vdX), ide (hda-hdd, i440fx machines) and sata (sda-sdf,
  q35 machines); scsi is refused: it needs a controller ferry does not add.
  A cdrom is always read-only; a shareable disk must be raw or read-only.
- Serial ports 0-3 (isa-serial); a console must be the serial console
  mirroring serial port 0 (a missing serial 0 is created from it, as libvirt).
- At most one ``<video>``; no default video is added; a missing
  ``<memballoon>`` means a virtio balloon; no default console is added.
- Runtime values (pty paths, autoport-assigned ports) are read only with
  ``parse_domain_xml(live=True)`` and written only by ``to_xml(live=True)``,
  so ``parse(to_xml(d)) == d`` for a definition and
  ``parse(to_xml(d, live=True), live=True) == d`` for a running domain.
- ``to_xml(migratable=True)`` equals the inactive XML: ferry adds no
  implicit devices that libvirt would strip.  ``secure=False`` drops passwords.
"""

from __future__ import annotations

import ipaddress
import os
import re
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lxml import etree

from workers.errors import InvalidInputError, UnsupportedError

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
MAX_XML_BYTES = 1024 * 1024
DEFAULT_MAX_MEMORY_KIB = 16 * 1024**3  # 16 TiB
DEFAULT_EMULATOR = "/usr/bin/qemu-system-x86_64"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_IDENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # machine and CPU model names
_DIGITS_RE = re.compile(r"[0-9]{1,24}")
_TARGET_RE = re.compile(r"(vd|hd|sd)([a-z]{1,2})")
_BUS_PREFIX = {"virtio": "vd", "ide": "hd", "sata": "sd", "scsi": "sd"}
_PREFIX_BUS = {"vd": "virtio", "hd": "ide", "sd": "scsi"}
_BUS_MAX_INDEX = {"virtio": 701, "ide": 3, "sata": 5}
_FEATURES = ("acpi", "apic", "pae")
_ACTIONS = ("destroy", "restart", "preserve", "rename-restart")
_CRASH_ACTIONS = (*_ACTIONS, "coredump-destroy", "coredump-restart")
_TIMERS = ("platform", "pit", "rtc", "hpet", "tsc", "kvmclock", "hypervclock")
_CACHES = ("default", "none", "writethrough", "writeback", "directsync", "unsafe")
_BOOT_DEVS = ("hd", "cdrom", "network", "fd")


def _check(ok: bool, message: str, exc: type[InvalidInputError] = InvalidInputError) -> None:
    if not ok:
        raise exc(message)


def _one_of(value: str | None, allowed: Sequence[str], what: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    _check(value in allowed, f"{what} {value!r} is not one of {', '.join(allowed)}")


def _abspath(path: str | None, what: str) -> None:
    _check(
        path is not None and path.startswith("/") and not re.search(r"[\x00-\x1f\x7f]", path),
        f"{what} {path!r} must be an absolute path without control characters",
    )


@dataclass(frozen=True, kw_only=True)
class Disk:
    """A file-backed disk or cdrom; `alias` names it identically on both hosts."""

    target: str
    bus: str
    source: str | None
    device: str = "disk"
    format: str = "raw"
    cache: str | None = None
    discard: str | None = None
    detect_zeroes: str | None = None
    readonly: bool = False
    shareable: bool = False
    boot_order: int | None = None

    def __post_init__(self) -> None:
        where = f"disk {self.target!r}"
        _one_of(self.device, ("disk", "cdrom"), f"{where} device")
        if self.bus == "scsi":
            raise UnsupportedError(f"{where} bus 'scsi' is not supported (needs a controller)")
        _one_of(self.bus, ("virtio", "ide", "sata"), f"{where} bus")
        m = _TARGET_RE.fullmatch(self.target)
        _check(
            m is not None and m[1] == _BUS_PREFIX[self.bus] and self.index <= _BUS_MAX_INDEX[self.bus],
            f"disk target dev {self.target!r} does not fit bus {self.bus!r}",
        )
        _one_of(self.format, ("raw", "qcow2"), f"{where} driver type")
        _one_of(self.cache, _CACHES, f"{where} driver cache", optional=True)
        _one_of(self.discard, ("unmap", "ignore"), f"{where} driver discard", optional=True)
        _one_of(self.detect_zeroes, ("off", "on", "unmap"), f"{where} detect_zeroes", True)
        if self.device == "cdrom":
            _check(self.bus != "virtio", f"{where}: a cdrom needs bus ide or sata", UnsupportedError)
            object.__setattr__(self, "readonly", True)
        if self.source is not None or self.device == "disk":
            _abspath(self.source, f"{where} source file")
        _check(
            not (self.shareable and self.format == "qcow2" and not self.readonly),
            f"{where}: a shareable writable disk must be raw, not qcow2",
            UnsupportedError,
        )
        _check(self.boot_order is None or self.boot_order >= 1, f"{where} boot order must be >= 1")

    @property
    def index(self) -> int:
        """vda=0, vdz=25, vdaa=26: libvirt's virDiskNameToIndex."""
        letters = self.target[2:]
        n = 0
        for ch in letters:
            n = n * 26 + (ord(ch) - ord("a") + 1)
        return n - 1

    @property
    def alias(self) -> str:
        """libvirt's device alias: virtio-disk0, ide0-1-0 (bus 1 unit 0), sata0-0-2."""
        if self.bus == "virtio":
            return f"virtio-disk{self.index}"
        if self.bus == "ide":
            return f"ide0-{self.index // 2}-{self.index % 2}"
        return f"sata0-0-{self.index}"


@dataclass(frozen=True, kw_only=True)
class Serial:
    """An isa-serial port; `path` of a pty is the runtime /dev/pts path (live only)."""

    type: str
    port: int
    path: str | None = None
    mode: str | None = None  # unix: bind (QEMU listens) | connect
    append: bool | None = None  # file

    def __post_init__(self) -> None:
        _one_of(self.type, ("pty", "file", "unix"), "serial type")
        _check(0 <= self.port <= 3, f"serial target port {self.port} is not in 0-3")
        if self.type != "pty" or self.path is not None:
            _abspath(self.path, f"serial {self.type} source path")
        if self.type == "unix":
            _one_of(self.mode, ("bind", "connect"), "serial unix source mode")

    @property
    def alias(self) -> str:
        return f"serial{self.port}"

    @property
    def chardev_id(self) -> str:
        return f"charserial{self.port}"


@dataclass(frozen=True, kw_only=True)
class Console:
    """The serial console: mirrors serial port 0, adds no device."""

    target_type: str = "serial"
    port: int = 0


@dataclass(frozen=True, kw_only=True)
class Graphics:
    """A VNC or SPICE display; `port` is None until autoport assigns one."""

    type: str
    port: int | None = None
    autoport: bool = True
    tls_port: int | None = None
    listen: str | None = None
    passwd: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _one_of(self.type, ("vnc", "spice"), "graphics type")
        low = 5900 if self.type == "vnc" else 1
        for what, port in (("port", self.port), ("tlsPort", self.tls_port)):
            _check(port is None or low <= port <= 65535, f"graphics {what} {port} is out of range")
        _check(self.tls_port is None or self.type == "spice", "graphics tlsPort is spice only")
        _check(self.autoport or self.port is not None, f"graphics {self.type} needs a port")
        if self.listen is not None:
            try:
                ipaddress.ip_address(self.listen)
            except ValueError:
                raise UnsupportedError(
                    f"graphics listen address {self.listen!r} is not an IP address"
                ) from None


@dataclass(frozen=True, kw_only=True)
class Timer:
    name: str
    tickpolicy: str | None = None
    present: bool | None = None

    def __post_init__(self) -> None:
        _one_of(self.name, _TIMERS, "clock timer name")
        _one_of(self.tickpolicy, ("delay", "catchup", "merge", "discard"), "timer tickpolicy", True)


@dataclass(frozen=True, kw_only=True)
class DomainDef:
    """One guest definition; validated on construction, so `replace` cannot smuggle bad values."""

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
    features: tuple[str, ...] = ()
    cpu_mode: str | None = None
    cpu_model: str | None = None
    cpu_topology: tuple[int, int, int] | None = None  # sockets, cores, threads
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
    videos: tuple[str, ...] = ()
    memballoon: str = "virtio"
    qemu_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        _check(
            0 < len(self.name) <= 64 and _NAME_RE.fullmatch(self.name) is not None
            and ".." not in self.name,
            f"domain <name> {self.name!r} must be 1-64 characters of A-Z a-z 0-9 _ . + - "
            "starting with a letter or digit, without '..'",
        )
        try:
            set_(self, "uuid", str(uuidlib.UUID(self.uuid)))
        except (ValueError, TypeError):
            raise InvalidInputError(f"domain <uuid> {self.uuid!r} is not a valid UUID") from None
        if self.type not in ("kvm", "qemu"):
            raise UnsupportedError(f"domain type {self.type!r} is not supported (kvm or qemu)")
        _check(self.memory_kib > 0, "domain <memory> must be greater than 0")
        if self.current_memory_kib is None:
            set_(self, "current_memory_kib", self.memory_kib)
        cur = self.current_memory_kib
        _check(cur is not None and 0 < cur <= self.memory_kib, f"<currentMemory> {cur} KiB is not in 1..<memory>")
        _check(1 <= self.vcpus <= 255, f"<vcpu> {self.vcpus} is not in 1-255")
        if self.vcpus_current == self.vcpus:
            set_(self, "vcpus_current", None)
        vc = self.vcpus_current
        _check(vc is None or 1 <= vc <= self.vcpus, f"<vcpu> current {vc} is not in 1..{self.vcpus}")
        _check(self.title is None or "\n" not in self.title, "domain <title> must be one line")
        _check(self.arch == "x86_64", f"os arch {self.arch!r} is not supported", UnsupportedError)
        _check(_IDENT_RE.fullmatch(self.machine) is not None, f"os machine {self.machine!r} is invalid")
        _check(self.os_type == "hvm", f"os type {self.os_type!r} is not supported", UnsupportedError)
        for dev in self.boot_devices:
            _one_of(dev, _BOOT_DEVS, "os boot dev")
        set_(self, "features", tuple(f for f in _FEATURES if f in self.features))
        _one_of(self.cpu_mode, ("host-passthrough", "host-model", "custom"), "cpu mode", True)
        _check(
            (self.cpu_mode == "custom") == (self.cpu_model is not None),
            "cpu mode 'custom' needs a <model> and only it takes one",
        )
        _check(
            self.cpu_model is None or _IDENT_RE.fullmatch(self.cpu_model) is not None,
            f"cpu model {self.cpu_model!r} is invalid",
        )
        if self.cpu_topology is not None:
            s, c, t = self.cpu_topology
            _check(min(s, c, t) >= 1 and s * c * t == self.vcpus, "cpu topology must multiply to <vcpu>")
        if self.clock_offset not in ("utc", "localtime"):
            raise UnsupportedError(f"clock offset {self.clock_offset!r} is not supported")
        _one_of(self.on_poweroff, _ACTIONS, "<on_poweroff>")
        _one_of(self.on_reboot, _ACTIONS, "<on_reboot>")
        _one_of(self.on_crash, _CRASH_ACTIONS, "<on_crash>")
        base = os.path.basename(self.emulator)
        _check(
            self.emulator.startswith("/")
            and (base.startswith("qemu-system-") or base == "qemu-kvm")
            and "\x00" not in self.emulator,
            f"<emulator> {self.emulator!r} must be an absolute path to qemu-system-* or qemu-kvm",
        )
        self._check_devices()

    def _check_devices(self) -> None:
        for what, keys in (
            ("disk target dev", [d.target for d in self.disks]),
            ("serial target port", [s.port for s in self.serials]),
            ("boot order", [d.boot_order for d in self.disks if d.boot_order is not None]),
        ):
            dup = {k for k in keys if keys.count(k) > 1}
            _check(not dup, f"duplicate {what} {sorted(dup)[0] if dup else ''!r}")
        _check(
            not (self.boot_devices and any(d.boot_order for d in self.disks)),
            "per-device <boot order> cannot be mixed with <os><boot dev>",
        )
        for con in self.consoles:
            _check(
                con.target_type == "serial" and con.port == 0,
                f"console target {con.target_type!r} port {con.port} is not supported "
                "(only the serial console on port 0)",
                UnsupportedError,
            )
            _check(any(s.port == 0 for s in self.serials), "the serial console needs serial port 0")
        _check(len(self.consoles) <= 1, "only one <console> is supported", UnsupportedError)
        _check(len(self.videos) <= 1, "only one <video> is supported", UnsupportedError)
        for model in self.videos:
            _one_of(model, ("vga", "cirrus", "qxl", "virtio", "none"), "video model type")
        _one_of(self.memballoon, ("virtio", "none"), "memballoon model")
        for arg in self.qemu_args:
            _check("\x00" not in arg, "qemu:arg value contains NUL")

    def inactive(self) -> DomainDef:
        """This definition without runtime values (pty paths, autoport-assigned ports)."""
        return replace(
            self,
            serials=tuple(replace(s, path=None) if s.type == "pty" else s for s in self.serials),
            graphics=tuple(replace(g, port=None) if g.autoport else g for g in self.graphics),
        )

    def to_element(self, *, live: bool = False, migratable: bool = False, secure: bool = True) -> Any:
        """The <domain> element (lxml) that `to_xml` serializes."""
        return _format(self if live and not migratable else self.inactive(), live and not migratable, secure)

    def to_xml(self, *, live: bool = False, migratable: bool = False, secure: bool = True) -> str:
        """Pretty domain XML; see the module docstring for live, migratable and secure."""
        elem = self.to_element(live=live, migratable=migratable, secure=secure)
        return str(etree.tostring(elem, pretty_print=True, encoding="unicode"))


def writable_disks(d: DomainDef) -> tuple[Disk, ...]:
    """Disks the guest may write and nobody shares: what the lock manager leases."""
    return tuple(x for x in d.disks if not x.readonly and not x.shareable and x.source)


def with_graphics_ports(d: DomainDef, ports: Sequence[int]) -> DomainDef:
    """Fill the ports of the autoport graphics, in order (the agent picks them from its range)."""
    auto = [i for i, g in enumerate(d.graphics) if g.autoport]
    if len(ports) != len(auto):
        raise ValueError(f"{len(auto)} autoport graphics but {len(ports)} ports")
    found = dict(zip(auto, ports, strict=True))
    return replace(d, graphics=tuple(
        replace(g, port=found[i]) if i in found else g for i, g in enumerate(d.graphics)
    ))


def with_pty_paths(d: DomainDef, paths: Mapping[str, str]) -> DomainDef:
    """Record the /dev/pts paths QEMU reported (query-chardev), keyed by chardev id."""
    return replace(d, serials=tuple(
        replace(s, path=paths[s.chardev_id])
        if s.type == "pty" and s.chardev_id in paths else s for s in d.serials
    ))


def serial_log_paths(d: DomainDef) -> tuple[str, ...]:
    """Files the guest's serial output goes to (the agent tails them)."""
    return tuple(s.path for s in d.serials if s.type == "file" and s.path)
