"""QEMU options for the devices of workers/devices.py (see workers/qemu_argv.py for the rules).

Ids follow libvirt's aliases (net0/hostnet0, channel0/charchannel0, usb, virtio-serial0,
pci.N for the root port of index N, rng0/objrng0, watchdog0, input0), so a
`qemu-monitor-command` written against libvirt finds the same devices.  The only
runtime inputs are file descriptors (`TapFds`, channel sockets), which are not guest ABI.
"""

from __future__ import annotations

from collections.abc import Mapping

from workers.devices import (
    NIC_MODELS,
    USB_MODELS,
    Channel,
    Controller,
    Input,
    Interface,
    PciAddress,
    Rng,
    Video,
    Watchdog,
    format_cpuset,
)
from workers.domain import Disk, DomainDef

TapFds = tuple[int, int | None]  # (tap fd, vhost-net fd or None)


def esc(value: str) -> str:
    """Escape a value for a QEMU option list: ',' separates options, ',,' is a comma."""
    return value.replace(",", ",,")


def opts(*parts: str | None) -> str:
    return ",".join(p for p in parts if p)


def pci(d: DomainDef, a: PciAddress | None) -> str | None:
    """bus=...,addr=... for an explicit address; None lets QEMU place the device."""
    if a is None:
        return None
    root = "pcie.0" if d.family == "q35" else "pci.0"
    bus = root if a.bus == 0 else f"pci.{a.bus}"
    fn = f".{a.function:x}" if a.function else ""
    return opts(f"bus={bus},addr=0x{a.slot:x}{fn}", "multifunction=on" if a.multifunction else None)


def controller_args(d: DomainDef) -> list[str]:
    """Root ports first (devices sit on them), then USB and virtio-serial."""
    out: list[str] = []
    ports = sorted((c for c in d.controllers if c.model == "pcie-root-port"), key=lambda c: c.index)
    for c in ports:
        out += ["-device", opts(f"{c.device},port=0x{c.port or 0:x},chassis={c.chassis}",
                                f"id=pci.{c.index}", pci(d, c.address))]
    for c in d.controllers:
        out += _controller(d, c)
    return out


def _controller(d: DomainDef, c: Controller) -> list[str]:
    if c.type == "usb" and c.model not in (None, "none"):
        ports = f"p2={c.ports},p3={c.ports}" if c.ports else None
        return ["-device", opts(USB_MODELS[c.model or ""], "id=usb", ports, pci(d, c.address))]
    if c.type == "scsi":
        return ["-device", opts(f"virtio-scsi-pci,id=scsi{c.index}", pci(d, c.address))]
    if c.type == "virtio-serial":
        return ["-device", opts("virtio-serial-pci,id=virtio-serial0",
                                f"max_ports={c.ports}" if c.ports else None,
                                f"vectors={c.vectors}" if c.vectors is not None else None,
                                pci(d, c.address))]
    return []


def mib(kib: int) -> str:
    return str(kib // 1024)


def video_args(d: DomainDef, v: Video) -> list[str]:
    props: list[str | None]
    if v.model == "vga":
        props = ["VGA", f"vgamem_mb={mib(v.vram)}" if v.vram else None]
    elif v.model == "cirrus":
        props = ["cirrus-vga", f"vgamem_mb={mib(v.vram)}" if v.vram else None]
    elif v.model == "qxl":
        props = ["qxl-vga", f"ram_size={v.ram * 1024}" if v.ram else None,
                 f"vram_size={v.vram * 1024}" if v.vram else None,
                 f"vgamem_mb={mib(v.vgamem)}" if v.vgamem else None,
                 f"max_outputs={v.heads}" if v.heads else None]
    elif v.model == "virtio":
        props = ["virtio-vga", f"max_outputs={v.heads}" if v.heads else None]
    elif v.model == "bochs":
        props = ["bochs-display", f"vgamem={v.vram * 1024}" if v.vram else None]
    else:
        return []
    return ["-device", opts(*props, "id=video0", pci(d, v.address))]


def disk_args(d: DomainDef, disk: Disk) -> list[str]:
    """A named -drive (drive-ALIAS, explicit format: no probing) and its -device ALIAS."""
    zeroes = disk.detect_zeroes
    if zeroes == "unmap" and disk.discard != "unmap":
        zeroes = "on"  # QEMU refuses unmap without discard=unmap; libvirt downgrades too
    src = None
    if disk.source is not None:
        src = (f"file.driver=host_device,file.filename={esc(disk.source)}"
               if disk.kind == "block" else f"file={esc(disk.source)}")
    werror = {"enospace": "enospc"}.get(disk.error_policy or "", disk.error_policy)
    rerror = disk.error_policy if disk.error_policy in ("stop", "report", "ignore") else None
    drive = opts(
        src,
        f"format={disk.format}" if disk.source is not None else None,
        f"if=none,id={disk.drive_id}",
        "media=cdrom" if disk.device == "cdrom" else None,
        "readonly=on" if disk.readonly else None,
        f"cache={disk.cache}" if disk.cache not in (None, "default") else None,
        f"aio={disk.io}" if disk.io else None,
        f"discard={disk.discard}" if disk.discard else None,
        f"detect-zeroes={zeroes}" if zeroes else None,
        f"werror={werror}" if werror else None,
        f"rerror={rerror}" if rerror else None,
    )
    kind = "ide-cd" if disk.device == "cdrom" else "ide-hd"
    if disk.bus == "virtio":
        model = opts("virtio-blk-pci", pci(d, disk.address))
    elif disk.drive is not None:  # scsi, as libvirt: the drive id is the disk's VPD id
        a = disk.drive
        model = opts(f"scsi-{'cd' if disk.device == 'cdrom' else 'hd'},bus=scsi{a.controller}.0,"
                     f"channel={a.bus},scsi-id={a.target},lun={a.unit}",
                     f"device_id={disk.drive_id}" if disk.device == "disk" else None)
    elif disk.bus == "sata":
        model = f"{kind},bus=ide.{disk.index}"  # ICH9's AHCI: one disk per port ide.0-5
    else:
        model = f"{kind},bus=ide.{disk.index // 2},unit={disk.index % 2}"
    device = opts(
        model,
        f"drive={disk.drive_id},id={disk.device_id}",
        f"serial={esc(disk.serial)}" if disk.serial else None,
        f"bootindex={disk.boot_order}" if disk.boot_order else None,
        "share-rw=on" if disk.shareable else None,
    )
    return ["-drive", drive, "-device", device]


def interface_args(d: DomainDef, i: int, n: Interface, taps: Mapping[int, TapFds]) -> list[str]:
    if n.type == "user":
        fwd = [f"hostfwd={pf.proto}:{pf.address}:{pf.start}-:{pf.to}" for pf in n.port_forwards]
        netdev = opts(f"user,id=hostnet{i}", *fwd)
    else:
        if i not in taps:
            raise ValueError(f"interface {i} ({n.mac}) has no tap fd: the host makes it first")
        fd, vhostfd = taps[i]
        vhost = f"vhost=on,vhostfd={vhostfd}" if vhostfd is not None else None
        netdev = opts(f"tap,fd={fd},id=hostnet{i}", vhost)
    device = opts(NIC_MODELS[n.model], f"netdev=hostnet{i},id=net{i},mac={n.mac}",
                  pci(d, n.address), f"bootindex={n.boot_order}" if n.boot_order else None)
    return ["-netdev", netdev, "-device", device]


def channel_args(i: int, c: Channel, fd: int | None = None) -> list[str]:
    """A virtserialport; a unix channel's socket by path, or through the listening
    fd the worker bound at that path (a confined QEMU could not bind there)."""
    if c.type == "unix" and fd is not None:
        chardev = f"socket,id=charchannel{i},fd={fd},server=on,wait=off"
    elif c.type == "unix":
        if c.path is None:
            raise ValueError(f"channel {c.name} has no socket path yet (with_channel_paths)")
        chardev = f"socket,id=charchannel{i},path={esc(c.path)},server=on,wait=off"
    else:
        chardev = f"spicevmc,id=charchannel{i},name=vdagent"
    device = (f"virtserialport,bus=virtio-serial0.0,nr={c.port},chardev=charchannel{i},"
              f"id=channel{i},name={c.name}")
    return ["-chardev", chardev, "-device", device]


_INPUTS = {("tablet", "usb"): "usb-tablet", ("mouse", "usb"): "usb-mouse",
           ("keyboard", "usb"): "usb-kbd", ("tablet", "virtio"): "virtio-tablet-pci",
           ("mouse", "virtio"): "virtio-mouse-pci", ("keyboard", "virtio"): "virtio-keyboard-pci"}


def input_args(i: int, inp: Input) -> list[str]:
    model = _INPUTS.get((inp.type, inp.bus))
    if model is None:  # ps2: the machine's own i8042
        return []
    return ["-device", opts(model, f"id=input{i}", "bus=usb.0" if inp.bus == "usb" else None)]


def rng_args(d: DomainDef, r: Rng) -> list[str]:
    rate = None
    if r.rate_bytes:
        rate = f"max-bytes={r.rate_bytes},period={r.rate_period_ms or 1000}"
    return ["-object", f"rng-random,id=objrng0,filename={esc(r.source)}",
            "-device", opts("virtio-rng-pci,rng=objrng0,id=rng0", rate, pci(d, r.address))]


def watchdog_args(d: DomainDef, w: Watchdog) -> list[str]:
    where = pci(d, w.address) if w.model == "i6300esb" else None
    return ["-device", opts(w.model, "id=watchdog0", where), "-watchdog-action", w.action]


def late_device_args(d: DomainDef, channel_fds: Mapping[int, int] | None = None) -> list[str]:
    """Channels, inputs, audio (after serial ports and graphics)."""
    out: list[str] = []
    for i, c in enumerate(d.channels):
        out += channel_args(i, c, (channel_fds or {}).get(i))
    for i, inp in enumerate(d.inputs):
        out += input_args(i, inp)
    for a in d.audios:
        out += ["-audiodev", f"{a.type},id=audio{a.id}"]
    return out


def firmware_args(d: DomainDef) -> list[str]:
    fw = d.firmware
    if fw is None:
        return []
    if fw.nvram is None:
        raise ValueError("the firmware has no nvram path yet: the host fills it before start")
    return ["-drive", f"if=pflash,format=raw,unit=0,file={esc(fw.loader)},readonly=on",
            "-drive", f"if=pflash,format=raw,unit=1,file={esc(fw.nvram)}"]


def kernel_args(d: DomainDef) -> list[str]:
    out: list[str] = []
    if d.kernel is not None:
        out += ["-kernel", d.kernel]
    if d.initrd is not None:
        out += ["-initrd", d.initrd]
    if d.cmdline is not None:
        out += ["-append", d.cmdline]
    return out


def cpu_option(d: DomainDef, use_kvm: bool) -> str | None:
    """-cpu: host (KVM) or max (TCG) for host-*, the named model with `enforce` for
    custom (QEMU then refuses to start rather than hide a missing feature from the
    guest), and +/- for each feature."""
    cpu = None
    if d.cpu_mode in ("host-passthrough", "host-model"):
        cpu = "host,arch-capabilities=off" if use_kvm else "max"
    elif d.cpu_mode == "custom" and d.cpu_model:
        cpu = d.cpu_model
    feats = [f"{'+' if f.on else '-'}{f.name}" for f in d.cpu_features]
    if cpu and (feats or d.cpu_mode == "custom"):
        cpu = opts(cpu, *feats, "enforce" if d.cpu_mode == "custom" else None)
    return cpu


def smp_option(d: DomainDef) -> str:
    smp = str(d.vcpus) if d.vcpus_current is None else f"{d.vcpus_current},maxcpus={d.vcpus}"
    t = d.cpu_topology
    if t is not None:
        smp += f",sockets={t.sockets},dies={t.dies},cores={t.cores},threads={t.threads}"
    return smp


def numa_args(d: DomainDef) -> list[str]:
    """Guest NUMA as libvirt: a memory-backend-ram per cell (id ram-nodeN, its RAM block
    in the migration stream), ``-numa node`` with its cpus, then the distances."""
    out: list[str] = []
    for c in d.numa:
        cpus = [f"cpus={r}" for r in format_cpuset(c.cpus)]
        out += ["-object", f"memory-backend-ram,id=ram-node{c.id},size={c.memory_kib * 1024}",
                "-numa", opts(f"node,nodeid={c.id}", *cpus, f"memdev=ram-node{c.id}")]
    for c in d.numa:
        for sibling, value in c.distances:
            out += ["-numa", f"dist,src={c.id},dst={sibling},val={value}"]
    return out
