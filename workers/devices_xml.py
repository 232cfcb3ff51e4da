"""libvirt's XML for the devices of workers/devices.py, both ways.

Read with the same rule as the rest of the domain: unknown child elements are
refused by name, and runtime values (kernel-named taps, host-picked channel
sockets) are kept only when reading a live (status) XML.
"""

from __future__ import annotations

from typing import Any

from workers.devices import (
    INPUT_TYPES,
    NIC_TYPES,
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
    PortForward,
    Rng,
    Topology,
    Video,
    Watchdog,
    check,
    format_cpuset,
    one_of,
    parse_cpuset,
    random_mac,
)
from workers.domain import DomainDef, auto_channel_path, auto_tap_name
from workers.errors import UnsupportedError
from workers.xmlutil import first, integer, kids, onoff, refuse_attrs, sub, text, yes


def pci_address(found: dict[str, list[Any]], where: str, other: tuple[str, ...] = ()
                ) -> PciAddress | None:
    """The ``<address type='pci'>`` among `found`; other address types must be in `other`."""
    if "address" not in found:
        return None
    e = found["address"][0]
    kind = e.get("type", "pci")
    if kind != "pci":
        check(kind in other, f"{where} address type {kind!r} is not supported", UnsupportedError)
        return None
    check((integer(e.get("domain", "0"), f"{where} pci domain", 0) or 0) == 0,
          f"{where} pci domain must be 0")
    return PciAddress(bus=integer(e.get("bus", "0"), f"{where} pci bus", 0) or 0,
                      slot=integer(e.get("slot", "0"), f"{where} pci slot", 0) or 0,
                      function=integer(e.get("function", "0"), f"{where} pci function", 0) or 0,
                      multifunction=bool(yes(e.get("multifunction"), "pci multifunction")))


def drive_address(found: dict[str, list[Any]], where: str) -> DriveAddress | None:
    """The ``<address type='drive'>`` among `found` (None for another type or none)."""
    if "address" not in found or found["address"][0].get("type") != "drive":
        return None
    e = found["address"][0]
    return DriveAddress(**{what: integer(e.get(what, "0"), f"{where} drive {what}") or 0
                           for what in ("controller", "bus", "target", "unit")})


def put_drive_address(parent: Any, a: DriveAddress | None) -> None:
    if a is not None:
        sub(parent, "address", type="drive", controller=a.controller, bus=a.bus,
            target=a.target, unit=a.unit)


def put_address(parent: Any, a: PciAddress | None) -> None:
    if a is not None:
        sub(parent, "address", type="pci", domain="0x0000", bus=f"0x{a.bus:02x}",
            slot=f"0x{a.slot:02x}", function=f"0x{a.function:x}",
            multifunction="on" if a.multifunction else None)


# ---------------------------------------------------------------- reading


def parse_interface(e: Any, live: bool) -> Interface:
    kind = e.get("type")
    one_of("interface ", "type", kind, NIC_TYPES, UnsupportedError)  # before its children
    k = kids(e, "mac source target model boot address", "alias", multi="portForward")
    src = first(k, "source")
    source = {"bridge": src.get("bridge"), "network": src.get("network"),
              "direct": src.get("dev")}.get(kind)
    tgt = first(k, "target")
    dev = tgt.get("dev")
    if dev is not None and auto_tap_name(dev) and not live:
        dev = None
    forwards = []
    for pf in k.get("portForward", ()):
        ranges = kids(pf, "", multi="range").get("range", ())
        check(bool(ranges), "interface portForward needs a <range>")
        for r in ranges:
            start = integer(r.get("start"), "portForward range start")
            forwards.append(PortForward(
                proto=pf.get("proto", "tcp"), address=pf.get("address") or "127.0.0.1",
                start=start or 0, to=integer(r.get("to"), "portForward range to") or start or 0))
    return Interface(
        type=kind,
        mac=(first(k, "mac").get("address") or random_mac()).lower(),
        model=first(k, "model").get("type", "virtio"),
        source=source,
        source_mode=src.get("mode", "vepa") if kind == "direct" else None,
        target_dev=dev,
        managed=tgt.get("managed", "yes") != "no",
        boot_order=integer(first(k, "boot").get("order"), "interface boot order"),
        port_forwards=tuple(forwards),
        address=pci_address(k, "interface"),
    )


def parse_channels(elems: list[Any], live: bool) -> tuple[Channel, ...]:
    out: list[Channel] = []
    for e in elems:
        k = kids(e, "source target address", "alias")
        tgt = first(k, "target")
        check(tgt.get("type") == "virtio", f"channel target type {tgt.get('type')!r} is not "
              "supported (virtio)", UnsupportedError)
        src = first(k, "source")
        check(src.get("mode", "bind") == "bind", "channel source mode must be 'bind'")
        path = src.get("path")
        if path is not None and auto_channel_path(path) and not live:
            path = None
        port = None
        if "address" in k:
            addr = k["address"][0]
            check(addr.get("type") == "virtio-serial", "channel address type must be "
                  "'virtio-serial'", UnsupportedError)
            check(addr.get("controller", "0") == "0" and addr.get("bus", "0") == "0",
                  "channel address: only virtio-serial controller 0 bus 0", UnsupportedError)
            port = integer(addr.get("port"), "channel address port")
        if port is None:  # libvirt: the lowest free port from 1
            port = min(set(range(1, 32)) - {c.port for c in out})
        out.append(Channel(type=e.get("type", "pty"), name=tgt.get("name") or "",
                           path=path if e.get("type") == "unix" else None, port=port))
    return tuple(out)


def parse_input(e: Any) -> Input:
    kind = e.get("type")
    one_of("input ", "type", kind, INPUT_TYPES, UnsupportedError)  # before its children
    refuse_attrs(e, f"input {kind}", model=("virtio",))
    k = kids(e, "address", "alias")
    pci_address(k, "input", ("usb",))
    return Input(type=kind, bus=e.get("bus", "usb" if kind == "tablet" else "ps2"))


def parse_controllers(elems: list[Any]) -> tuple[Controller, ...]:
    """libvirt's rule for a controller without an index: the lowest one its type has free."""
    given = [(e.get("type"), integer(e.get("index"), "controller index")) for e in elems]
    taken = {(kind, i) for kind, i in given if i is not None}
    out = []
    for e, (kind, index) in zip(elems, given, strict=True):
        if index is None:
            index = next(i for i in range(256) if (kind, i) not in taken)
            taken.add((kind, index))
        out.append(parse_controller(e, index))
    return tuple(out)


def parse_controller(e: Any, index: int) -> Controller:
    kind = e.get("type")
    model = e.get("model")
    # A type or model ferry lacks is refused by name before any child is read (else a
    # USB companion's <master> would be what the refusal names): a trial construction.
    root = kind != "pci" or model in ("pci-root", "pcie-root")
    Controller(type=kind, model=model, index=0 if root else 1)
    k = kids(e, "model target address driver", "alias")
    driver = first(k, "driver")  # guest-visible tuning ferry does not model
    refuse_attrs(driver, f"controller {kind} driver", **{a: () for a in driver.attrib})
    name = k["model"][0].get("name") if "model" in k else None
    root_port = model == "pcie-root-port"
    check(root_port or name in (None, model), f"controller {kind} model name {name!r} is "
          f"not supported ({model})", UnsupportedError)
    tgt = first(k, "target")
    return Controller(
        type=kind,
        index=index,
        model=model,
        ports=integer(e.get("ports"), "controller ports"),
        vectors=integer(e.get("vectors"), "controller vectors"),
        chassis=integer(tgt.get("chassis"), "controller target chassis", 0),
        port=integer(tgt.get("port"), "controller target port", 0),
        device=name if root_port else None,
        address=pci_address(k, f"controller {kind}"),
    )


def parse_video(e: Any) -> Video:
    k = kids(e, "model address", "alias")
    check("model" in k, "video <model> is missing")
    m = k["model"][0]
    refuse_attrs(m, "video model", vram64=(), blob=("off",))
    check(m.get("primary", "yes") == "yes", "a secondary video is not supported",
          UnsupportedError)
    return Video(
        model=m.get("type"),
        vram=integer(m.get("vram"), "video vram"),
        ram=integer(m.get("ram"), "video ram"),
        vgamem=integer(m.get("vgamem"), "video vgamem"),
        heads=integer(m.get("heads"), "video heads"),
        address=pci_address(k, "video"),
    )


def parse_rng(e: Any) -> Rng:
    model = e.find("backend").get("model") if e.find("backend") is not None else None
    check(model in (None, "random"), f"rng backend model {model!r} is not supported "
          "(random)", UnsupportedError)  # before the backend's children
    k = kids(e, "backend rate address", "alias")
    backend = first(k, "backend")
    rate = first(k, "rate")
    return Rng(
        model=e.get("model", "virtio"),
        source=(backend.text or "/dev/urandom").strip(),
        rate_bytes=integer(rate.get("bytes"), "rng rate bytes"),
        rate_period_ms=integer(rate.get("period"), "rng rate period"),
        address=pci_address(k, "rng"),
    )


def parse_watchdog(e: Any) -> Watchdog:
    k = kids(e, "address", "alias")
    return Watchdog(model=e.get("model"), action=e.get("action", "reset"),
                    address=pci_address(k, "watchdog", ("isa",)))


def parse_audio(e: Any) -> Audio:
    kids(e, "")
    return Audio(id=integer(e.get("id", "1"), "audio id") or 1, type=e.get("type"))


def parse_firmware(os_: dict[str, list[Any]]) -> Firmware | None:
    if "loader" not in os_:
        check("nvram" not in os_, "os nvram needs an os loader")
        return None
    loader, nvram = os_["loader"][0], first(os_, "nvram")
    refuse_attrs(loader, "os loader", stateless=("no",), format=("raw",))
    refuse_attrs(nvram, "os nvram", format=("raw",))
    check(loader.get("secure", "no") == "no", "os loader secure='yes' (Secure Boot) is not "
          "supported", UnsupportedError)
    return Firmware(
        loader=(loader.text or "").strip(),
        readonly=loader.get("readonly", "yes") == "yes",
        type=loader.get("type", "pflash"),
        nvram=(nvram.text or "").strip() or None,
        template=nvram.get("template"),
    )


def parse_cpu(e: Any) -> dict[str, Any]:
    """The DomainDef fields of ``<cpu>``: mode, model, features, topology."""
    k = kids(e, "model topology numa", multi="feature")
    check(e.get("match", "exact") in ("exact", "strict"), f"cpu match {e.get('match')!r} is "
          "not supported (exact)", UnsupportedError)
    refuse_attrs(e, "cpu", migratable=("on",))
    refuse_attrs(first(k, "model"), "cpu model", vendor_id=())
    model = text(k, "model") or None
    mode = e.get("mode", "custom" if model else None)
    feats = tuple(CpuFeature(name=f.get("name") or "", policy=f.get("policy", "require"))
                  for f in k.get("feature", ()))
    top = None
    if "topology" in k:
        t = k["topology"][0]
        refuse_attrs(t, "cpu topology", clusters=("1",))
        top = Topology(**{what: integer(t.get(what, "1"), f"cpu topology {what}") or 0
                          for what in ("sockets", "dies", "cores", "threads")})
    return {"cpu_mode": mode, "cpu_model": model if mode == "custom" else None,
            "cpu_features": feats, "cpu_topology": top}


# ---------------------------------------------------------------- writing


def put_os_boot(os_: Any, d: DomainDef) -> None:
    fw = d.firmware
    if fw is not None:
        sub(os_, "loader", fw.loader, readonly="yes" if fw.readonly else "no", type=fw.type)
        if fw.nvram or fw.template:
            sub(os_, "nvram", fw.nvram, template=fw.template)
    for what in ("kernel", "initrd", "cmdline"):
        sub(os_, what, getattr(d, what), when=getattr(d, what) is not None)
    sub(os_, "bootmenu", enable=onoff(d.boot_menu, "yes", "no"),
        timeout=d.boot_menu_timeout_ms, when=d.boot_menu is not None)


def parse_numa_cell(e: Any, memory_kib: int, position: int) -> NumaCell:
    """One ``<cell>`` (its id defaults to its position); `memory_kib` is its memory,
    read by the caller (units)."""
    refuse_attrs(e, "cpu numa cell", memAccess=("default",), discard=("no",))
    k = kids(e, "distances")
    siblings = kids(first(k, "distances"), "", multi="sibling").get("sibling", ())
    return NumaCell(
        id=integer(e.get("id", str(position)), "cpu numa cell id") or 0,
        cpus=parse_cpuset(e.get("cpus"), "cpu numa cell cpus") if e.get("cpus") else (),
        memory_kib=memory_kib,
        distances=tuple((integer(s.get("id"), "numa sibling id") or 0,
                         integer(s.get("value"), "numa sibling value") or 0)
                        for s in siblings))


def put_numa(cpu: Any, d: DomainDef) -> None:
    if not d.numa:
        return
    numa = sub(cpu, "numa")
    for c in d.numa:
        cell = sub(numa, "cell", id=c.id, cpus=",".join(format_cpuset(c.cpus)) or None,
                   memory=c.memory_kib, unit="KiB")
        if c.distances:
            dist = sub(cell, "distances")
            for sibling, value in c.distances:
                sub(dist, "sibling", id=sibling, value=value)


def put_cpu(root: Any, d: DomainDef) -> None:
    if not (d.cpu_mode or d.cpu_topology or d.numa):
        return
    cpu = sub(root, "cpu", mode=d.cpu_mode)
    sub(cpu, "model", d.cpu_model, when=bool(d.cpu_model))
    t = d.cpu_topology
    if t is not None:
        sub(cpu, "topology", sockets=t.sockets, dies=t.dies, cores=t.cores, threads=t.threads)
    for f in d.cpu_features:
        sub(cpu, "feature", policy=f.policy, name=f.name)
    put_numa(cpu, d)


def put_devices(devices: Any, d: DomainDef, live: bool) -> None:
    """Everything of workers/devices.py, after the disks, in libvirt's order."""
    for c in d.controllers:
        e = sub(devices, "controller", type=c.type, index=c.index, model=c.model, ports=c.ports,
                vectors=c.vectors)
        if c.model == "pcie-root-port":
            sub(e, "model", name=c.device)
            sub(e, "target", chassis=c.chassis, port=f"0x{c.port or 0:x}")
        put_address(e, c.address)
    for i, n in enumerate(d.interfaces):
        e = sub(devices, "interface", type=n.type)
        sub(e, "mac", address=n.mac)
        if n.type == "direct":
            sub(e, "source", dev=n.source, mode=n.source_mode)
        elif n.source is not None:
            sub(e, "source").set(n.type, n.source)
        if n.target_dev is not None:
            sub(e, "target", dev=n.target_dev, managed=None if n.managed else "no")
        sub(e, "model", type=n.model)
        for pf in n.port_forwards:
            sub(sub(e, "portForward", proto=pf.proto, address=pf.address), "range",
                start=pf.start, to=pf.to)
        sub(e, "boot", order=n.boot_order, when=n.boot_order is not None)
        sub(e, "alias", name=f"net{i}", when=live)
        put_address(e, n.address)


def put_late_devices(devices: Any, d: DomainDef, live: bool) -> None:
    """Channels, inputs, audio, video, watchdog, rng: after the serial ports and graphics."""
    for i, c in enumerate(d.channels):
        e = sub(devices, "channel", type=c.type)
        if c.type == "unix":
            sub(e, "source", mode="bind", path=c.path)
        sub(e, "target", type="virtio", name=c.name)
        sub(e, "alias", name=f"channel{i}", when=live)
        sub(e, "address", type="virtio-serial", controller="0", bus="0", port=c.port)
    for inp in d.inputs:
        sub(devices, "input", type=inp.type, bus=inp.bus)
    for a in d.audios:
        sub(devices, "audio", id=a.id, type=a.type)
    for v in d.videos:
        e = sub(devices, "video")
        sub(e, "model", type=v.model, vram=v.vram, ram=v.ram, vgamem=v.vgamem, heads=v.heads,
            primary="yes" if v.model != "none" else None)
        sub(e, "alias", name="video0", when=live and v.model != "none")
        put_address(e, v.address)
    for w in d.watchdogs:
        put_address(sub(devices, "watchdog", model=w.model, action=w.action), w.address)
    for r in d.rngs:
        e = sub(devices, "rng", model=r.model)
        sub(e, "backend", r.source, model="random")
        sub(e, "rate", bytes=r.rate_bytes, period=r.rate_period_ms,
            when=r.rate_bytes is not None)
        put_address(e, r.address)


def bool_attr(flag: bool) -> str | None:
    return onoff(flag, "yes", "no")
