"""The guest ABI check: may this definition take over a guest running from that one?

This is libvirt's virDomainDefCheckABIStability for ferry's subset of the domain
XML.  Migration Begin runs it on a destination definition (``--xml FILE``) and
restore on a replacement definition (``--xml``): the source is the definition the
guest runs (or was saved) with, the target the one QEMU would start from.  The
target must give the guest the same machine: anything it can see must be equal,
anything only the host sees may differ.

Must be equal: uuid, name (ferry renames no guest; libvirt allows another name only
with a dname), domain type, vcpus (maximum and current), memory and currentMemory,
os type, arch and machine, the acpi/apic/pae/vmport features, cpu mode, model, features
(name and policy), topology and NUMA cells (cpus, memory, distances), ACPI S3/S4
(``<pm>``), the firmware loader, clock offset and timers, the memballoon model and
PCI address, the qemu:commandline args, and per device class the count and, pairwise
in order:

- disks: device (disk/cdrom), bus, target dev, readonly and shareable, serial, PCI
  address, the SCSI drive address (controller, bus, target, unit), and the driver
  format (libvirt leaves format alone because a storage copy may convert it; ferry
  copies no storage, so both ends open the same file and must read it the same way);
- interfaces: MAC, model and PCI address (not the type, bridge, network or tap);
- channels: type, target name and virtio-serial port (not the socket path);
- inputs: type and bus; controllers: type, index, model, ports, root port
  device (pcie-root-port or ioh3420), chassis/port and PCI address;
- videos: model, vram, ram, vgamem, heads and PCI address;
- rng and watchdog: model and PCI address (not the rng source or rate, nor the
  watchdog action);
- serials: the target port (the target type is always isa-serial), not the
  source: pty, file or unix, path, append;
- consoles: the target type and port;
- graphics: the type, not the listen address, ports, autoport or password.

May differ: title, description, on_poweroff/on_reboot/on_crash, the emulator,
the boot order, the direct-boot kernel, initrd and cmdline (read once at boot), the
NVRAM path and template, disk source paths and type (file or block), cache, io,
discard, detect_zeroes and error_policy, NIC bridges and taps, audio backends.

Messages read ``target <what> <target value> does not match source <source
value>``, naming a disk by its source target dev and other devices by index
(``serial[0]``).  When
a device count differs, the devices of that class are not compared pairwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from workers.devices import NumaCell, format_cpuset
from workers.domain import DomainDef, Timer
from workers.errors import InvalidInputError

__all__ = ["abi_diff", "check_abi_stability"]


def check_abi_stability(src: DomainDef, dst: DomainDef) -> None:
    """Raise InvalidInputError naming the first guest-visible difference of `dst` from `src`."""
    diffs = abi_diff(src, dst)
    if diffs:
        raise InvalidInputError(diffs[0])


def abi_diff(src: DomainDef, dst: DomainDef) -> list[str]:
    """Every guest-visible difference of `dst` from `src`, in libvirt's order; [] when none."""
    out: list[str] = []

    def add(what: str, a: object, b: object, unit: str = "", note: str = "") -> None:
        if a != b:
            a, b = _show(a) + unit, _show(b) + unit
            out.append(f"target {what} {b} does not match source {a}{note}")

    def cmp(what: str, get: Callable[[DomainDef], object], unit: str = "", note: str = "") -> None:
        add(what, get(src), get(dst), unit, note)

    cmp("domain type", lambda d: d.type)
    cmp("domain uuid", lambda d: d.uuid)
    cmp("domain name", lambda d: d.name, note=" (a guest keeps its name: renaming is refused)")
    cmp("domain memory", lambda d: d.memory_kib, " KiB")
    if src.memory_kib == dst.memory_kib:  # else a defaulted currentMemory differs as well
        cmp("domain currentMemory", lambda d: d.current_memory_kib or d.memory_kib, " KiB")
    cmp("domain vcpus", lambda d: d.vcpus)
    if src.vcpus == dst.vcpus:  # likewise a defaulted current count
        cmp("domain current vcpus", lambda d: d.vcpus_current or d.vcpus)
    cmp("domain os type", lambda d: d.os_type)
    cmp("domain arch", lambda d: d.arch)
    cmp("domain machine", lambda d: d.machine)
    for name in sorted({*src.features, *dst.features}):
        add(f"domain feature {name}", *("on" if name in d.features else "off" for d in (src, dst)))
    cmp("domain feature vmport", lambda d: d.vmport)
    cmp("domain pm suspend-to-mem", lambda d: d.suspend_to_mem)
    cmp("domain pm suspend-to-disk", lambda d: d.suspend_to_disk)
    cmp("domain cpu mode", lambda d: d.cpu_mode)
    cmp("domain cpu model", lambda d: d.cpu_model)
    cmp("domain cpu features", lambda d: tuple(f"{f.policy}:{f.name}" for f in d.cpu_features))
    cmp("domain cpu topology", lambda d: _topology(d))
    cmp("domain cpu numa", lambda d: tuple(_cell(c) for c in d.numa))
    cmp("domain os loader", lambda d: d.firmware.loader if d.firmware else None)
    cmp("domain clock offset", lambda d: d.clock_offset)
    cmp("domain clock timers", lambda d: tuple(_timer(t) for t in d.timers))

    # (count name, item name with {i} and {t} (source target dev), the devices, compared fields)
    classes: list[tuple[str, str, Sequence[Any], Sequence[Any], tuple[str, ...]]] = [
        ("disk", "disk {t}", src.disks, dst.disks, _DISK_FIELDS),
        ("serial", "serial[{i}]", src.serials, dst.serials, ("port",)),
        ("console", "console[{i}]", src.consoles, dst.consoles, ("target_type", "port")),
        ("graphics", "graphics[{i}]", src.graphics, dst.graphics, ("type",)),
        ("interface", "interface[{i}]", src.interfaces, dst.interfaces,
         ("mac", "model", "address")),
        ("channel", "channel[{i}]", src.channels, dst.channels, ("type", "name", "port")),
        ("input", "input[{i}]", src.inputs, dst.inputs, ("type", "bus")),
        ("controller", "controller[{i}]", src.controllers, dst.controllers,
         ("type", "index", "model", "device", "ports", "vectors", "chassis", "port",
          "address")),
        ("video", "video[{i}]", src.videos, dst.videos,
         ("model", "vram", "ram", "vgamem", "heads", "address")),
        ("rng", "rng[{i}]", src.rngs, dst.rngs, ("model", "address")),
        ("watchdog", "watchdog[{i}]", src.watchdogs, dst.watchdogs, ("model", "address")),
    ]
    for kind, item, mine, theirs, fields in classes:
        if len(mine) != len(theirs):
            add(f"domain {kind} count", len(mine), len(theirs))
            continue
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            name = item.format(i=i, t=getattr(a, "target", ""))
            for f in fields:
                add(f"{name} {_FIELD_NAMES.get(f, f)}", getattr(a, f), getattr(b, f))
    cmp("memballoon model", lambda d: d.memballoon)
    cmp("memballoon address", lambda d: d.memballoon_address)
    cmp("domain qemu:commandline args", lambda d: repr(list(d.qemu_args)))
    return out


_DISK_FIELDS = ("device", "bus", "target", "format", "readonly", "shareable", "serial",
                "address", "drive")
_FIELD_NAMES = {"target": "target dev", "port": "target port", "target_type": "target type",
                "address": "pci address", "drive": "drive address"}


def _topology(d: DomainDef) -> str | None:
    t = d.cpu_topology
    return None if t is None else f"{t.sockets}s{t.dies}d{t.cores}c{t.threads}t"


def _cell(c: NumaCell) -> str:
    """cell 0 as 0:cpus=0-1:mem=524288:dist=1/21 (the cpus with +)."""
    dist = "/".join(f"{s}={v}" for s, v in c.distances)
    return f"{c.id}:cpus={'+'.join(format_cpuset(c.cpus)) or '-'}:{c.memory_kib}KiB" + (
        f":dist={dist}" if dist else "")


def _timer(t: Timer) -> str:
    opts = [f"tickpolicy={t.tickpolicy}"] if t.tickpolicy else []
    opts += [] if t.present is None else [f"present={_show(t.present)}"]
    return f"{t.name}({','.join(opts)})" if opts else t.name


def _show(value: object) -> str:
    """One word for a value: none, yes/no, a comma list."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value) or "none"
    return str(value)  # a PciAddress shows as bus:slot.function
