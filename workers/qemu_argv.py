"""The QEMU command line for a DomainDef: a pure function of the definition.

Why pure and XML-derived: the source and the destination of a migration must
build the same device tree (same ids, same PCI slot order), so every id and
option below comes from the definition alone, never from host state.  Runtime
inputs (the monitor fd, the pidfile, whether KVM works, autoport ports already
filled in by `with_graphics_ports`) only touch options that are not guest ABI.

Choices:

- The monitor is an already listening unix socket the agent passes as a fd
  (``-chardev socket,fd=N,server=on,wait=off``): the agent binds it before
  QEMU starts, so there is no race on the path and no retry loop.  Serial log
  files and unix sockets come the same way (`Handover`: ``-add-fd`` +
  ``/dev/fdset/N``, ``socket,fd=N``), so a confined QEMU needs no access to
  their directories; the worker writes the pidfile itself (QEMU's own
  ``-pidfile`` would need a directory its user can write).
- QEMU always starts paused (``-S``); the agent resumes it or migrates into it.
- Disks are ``-drive if=none,id=drive-ALIAS`` + ``-device ...,id=ALIAS`` with
  libvirt's aliases (virtio-disk0, ide0-0-0; also serial0, video0, balloon0).
  Not ``-blockdev``: its backend is anonymous, so query-block/blockstats would
  report no ``device`` and a QOM path as virtio's ``qdev``; a named drive
  reports ``device=drive-ALIAS`` for every bus, and libvirt's cache names are
  -drive's.  The format is always explicit (no probing) and sources are
  absolute (no ``proto:`` prefix parsing).  PCI devices are created in a fixed
  order (video, disks, balloon), so QEMU assigns the same slots on both hosts.
- Passwords never reach argv (``ps`` shows it): VNC gets ``password=on`` and
  SPICE gets ticketing; the agent sets the password over QMP.
- KVM is used only for ``type='kvm'`` and when `kvm` is true (then
  ``accel=kvm:tcg``); host-passthrough becomes ``-cpu host`` under KVM and ``-cpu
  max`` under TCG, and so does a host-model that arrives unexpanded (the host
  expands host-model to a custom model before start: workers/cpumodel.py).
  ``arch-capabilities=off`` goes with ``host``: on these (nested, AMD) machines QEMU
  7.2 aborts setting MSR 0x10a otherwise.
- Timers: hpet present='no' gives ``hpet=off``, rtc tickpolicy='catchup' gives
  ``driftfix=slew``; the others keep QEMU's defaults (kvm-pit already delays
  lost ticks).
- ``on_poweroff`` other than destroy adds ``-no-shutdown`` (the agent then acts);
  ``on_reboot=destroy`` adds ``-no-reboot``.
- Every free-form value inside a QEMU option list (paths) doubles its commas;
  names, machine types and models are validated by the domain model.
"""

from __future__ import annotations

import functools
import ipaddress
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from workers.domain import DomainDef, Graphics, Serial
from workers.errors import InvalidInputError, UnsupportedError
from workers.qemu_devices import (
    TapFds,
    controller_args,
    cpu_option,
    disk_args,
    firmware_args,
    interface_args,
    kernel_args,
    late_device_args,
    numa_args,
    pci,
    rng_args,
    smp_option,
    video_args,
    watchdog_args,
)

_BOOT = {"hd": "c", "cdrom": "d", "network": "n", "fd": "a"}
_INCOMING = ("tcp:", "unix:", "fd:")
DEFAULT_LISTEN = "127.0.0.1"


def qemu_escape(value: str) -> str:
    """Escape a value for a QEMU option list: ',' separates options, ',,' is a comma."""
    return value.replace(",", ",,")


def _opts(*parts: str | None) -> str:
    return ",".join(p for p in parts if p)


@dataclass(frozen=True)
class Handover:
    """What the worker opened for QEMU (a confined QEMU could not), by serial alias:
    file descriptors of serial log files and of unix sockets (listening for mode
    'bind', connected for mode 'connect'), and the listening sockets of unix
    channels by channel index, passed to the QEMU process."""

    serial_files: Mapping[str, int] = field(default_factory=dict)
    serial_sockets: Mapping[str, int] = field(default_factory=dict)
    channel_sockets: Mapping[int, int] = field(default_factory=dict)  # by channel index

    def fds(self) -> list[int]:
        return [*self.serial_files.values(), *self.serial_sockets.values(),
                *self.channel_sockets.values()]


SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
_SERIAL_FDSET = 10  # -add-fd sets of serial files: 10 + port


def build_qemu_argv(
    d: DomainDef,
    *,
    qmp_fd: int,
    pidfile: str | None = None,
    kvm: bool,
    incoming: str | None = None,
    extra: Sequence[str] = (),
    spice: bool = True,
    taps: Mapping[int, TapFds] | None = None,
    sandbox: bool = False,
    handover: Handover | None = None,
) -> list[str]:
    """argv (argv[0] is the emulator) for `d`; `spice` says whether this QEMU has SPICE;
    `taps` the open tap (and vhost-net) fds of the tap NICs, by interface index;
    `sandbox` adds QEMU's seccomp sandbox; `handover` has the fds the worker opened."""
    if qmp_fd < 0:
        raise ValueError(f"qmp_fd must be an open file descriptor, not {qmp_fd}")
    use_kvm = kvm and d.type == "kvm"
    hpet_off = any(t.name == "hpet" and t.present is False for t in d.timers)
    slew = any(t.name == "rtc" and t.tickpolicy == "catchup" for t in d.timers)
    machine = _opts(
        d.machine,
        "accel=kvm:tcg" if use_kvm else "accel=tcg",
        None if "acpi" in d.features else "acpi=off",
        None if d.vmport is None else f"vmport={'on' if d.vmport else 'off'}",
        "hpet=off" if hpet_off else None,
    )
    argv = [d.emulator, "-name", f"guest={d.name},debug-threads=on", "-S"]
    argv += ["-uuid", d.uuid, "-machine", machine]
    argv += firmware_args(d)
    cpu = cpu_option(d, use_kvm)
    # libvirt's <timer name='kvmclock' present='no'/>: no paravirtual clock page that
    # KVM rewrites in guest memory (e.g. on the dest of a migration).
    if any(t.name == "kvmclock" and t.present is False for t in d.timers):
        cpu = _opts(cpu or "qemu64", "kvmclock=off")
    if cpu:
        argv += ["-cpu", cpu]
    mem_kib = -(-d.memory_kib // 1024) * 1024  # QEMU wants whole MiB here; libvirt rounds up too
    argv += ["-m", f"size={mem_kib}k", "-smp", smp_option(d), *numa_args(d)]
    argv += ["-no-user-config", "-nodefaults", "-display", "none"]
    argv += ["-chardev", f"socket,id=charmonitor,fd={qmp_fd},server=on,wait=off"]
    argv += ["-mon", "chardev=charmonitor,id=monitor,mode=control"]
    if pidfile is not None:
        argv += ["-pidfile", pidfile]
    if sandbox:
        argv += ["-sandbox", SANDBOX]
    argv += ["-rtc", _opts(f"base={d.clock_offset}", "driftfix=slew" if slew else None)]
    if d.on_reboot == "destroy":
        argv.append("-no-reboot")
    if d.on_poweroff != "destroy":
        argv.append("-no-shutdown")
    lpc = "ICH9-LPC" if d.family == "q35" else "PIIX4_PM"
    for flag, state in ((d.suspend_to_mem, "s3"), (d.suspend_to_disk, "s4")):
        if flag is not None:
            argv += ["-global", f"{lpc}.disable_{state}={0 if flag else 1}"]
    argv += kernel_args(d)
    boot = None
    if any(x.boot_order for x in d.disks) or any(n.boot_order for n in d.interfaces):
        boot = "strict=on"
    elif d.boot_devices:
        boot = "order=" + "".join(_BOOT[dev] for dev in d.boot_devices)
    wait = d.boot_menu_timeout_ms
    menu = _opts("menu=on", None if wait is None else f"splash-time={wait}") \
        if d.boot_menu else None
    if boot or menu:
        argv += ["-boot", _opts(boot, menu)]
    argv += controller_args(d)
    for video in d.videos:
        argv += video_args(d, video)
    for disk in d.disks:
        argv += disk_args(d, disk)
    for i, nic in enumerate(d.interfaces):
        argv += interface_args(d, i, nic, taps or {})
    for serial in d.serials:
        argv += _chardev_args(serial, handover or Handover())
        argv += [
            "-device",
            f"isa-serial,chardev={serial.chardev_id},id={serial.alias},index={serial.port}",
        ]
    for g in d.graphics:
        argv += _graphics_args(g, spice)
    argv += late_device_args(d, (handover or Handover()).channel_sockets)
    if d.memballoon == "virtio":
        argv += ["-device", ",".join(filter(None, ("virtio-balloon-pci,id=balloon0",
                                                   pci(d, d.memballoon_address))))]
    for rng in d.rngs:
        argv += rng_args(d, rng)
    for dog in d.watchdogs:
        argv += watchdog_args(d, dog)
    if incoming is not None:
        if incoming != "defer" and not incoming.startswith(_INCOMING):
            raise InvalidInputError(f"incoming URI {incoming!r} is not defer, tcp:, unix: or fd:")
        argv += ["-incoming", incoming]
    return argv + list(extra) + list(d.qemu_args)


def _chardev_args(s: Serial, handover: Handover) -> list[str]:
    """-chardev for a serial: by path, or through the fd the worker opened."""
    server = "server=on,wait=off" if s.mode == "bind" else "server=off"
    if s.type == "file" and s.alias in handover.serial_files:
        fdset = _SERIAL_FDSET + s.port
        return ["-add-fd", f"fd={handover.serial_files[s.alias]},set={fdset},opaque={s.alias}",
                "-chardev", _opts(f"file,id={s.chardev_id},path=/dev/fdset/{fdset}",
                                  "append=on" if s.append else None)]
    if s.type == "unix" and s.alias in handover.serial_sockets:
        fd = handover.serial_sockets[s.alias]
        return ["-chardev", f"socket,id={s.chardev_id},fd={fd},{server}"]
    return ["-chardev", _chardev(s)]


def _chardev(s: Serial) -> str:
    if s.type == "pty":
        return f"pty,id={s.chardev_id}"
    path = qemu_escape(s.path or "")
    if s.type == "file":
        return _opts(f"file,id={s.chardev_id},path={path}", "append=on" if s.append else None)
    server = "server=on,wait=off" if s.mode == "bind" else "server=off"
    return f"socket,id={s.chardev_id},path={path},{server}"


def _graphics_args(g: Graphics, spice: bool) -> list[str]:
    if g.port is None:
        raise ValueError(f"graphics {g.type} has no port yet: fill autoport (with_graphics_ports)")
    addr = g.listen or DEFAULT_LISTEN
    if g.type == "vnc":
        host = f"[{addr}]" if ipaddress.ip_address(addr).version == 6 else addr
        return ["-vnc", _opts(f"{host}:{g.port - 5900}", "password=on" if g.passwd else None)]
    if not spice:
        raise UnsupportedError("graphics spice is not supported: this QEMU has no SPICE support")
    ticketing = None if g.passwd else "disable-ticketing=on"
    return ["-spice", _opts(f"port={g.port},addr={addr}", ticketing, "seamless-migration=on")]


@functools.lru_cache(maxsize=8)
def qemu_has_spice(emulator: str) -> bool:
    """Whether `emulator` has SPICE: ``-spice help`` lists its options (but exits 1 in 7.2)."""
    try:
        done = subprocess.run(
            [emulator, "-spice", "help"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return b"disable-ticketing" in done.stdout + done.stderr
