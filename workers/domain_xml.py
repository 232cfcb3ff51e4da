"""The domain XML codec: libvirt's domain XML to the model in workers/domain.py and back.

Parsing refuses anything outside the subset by name; see the docstring of
workers/domain.py for what the subset is and which runtime values `live` keeps.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from typing import Any

from lxml import etree

from workers.devices_xml import (
    drive_address,
    parse_audio,
    parse_channels,
    parse_controllers,
    parse_cpu,
    parse_firmware,
    parse_input,
    parse_interface,
    parse_numa_cell,
    parse_rng,
    parse_video,
    parse_watchdog,
    pci_address,
    put_address,
    put_cpu,
    put_devices,
    put_drive_address,
    put_late_devices,
    put_os_boot,
)
from workers.domain import (
    DEFAULT_EMULATOR,
    FEATURES,
    Console,
    Disk,
    DomainDef,
    Graphics,
    Serial,
    Timer,
    check,
    check_enums,
)
from workers.errors import InvalidInputError, UnsupportedError, one_line
from workers.xmlutil import (
    QEMU_NS,
    Kids,
    first,
    integer,
    kids,
    onoff,
    refuse_attrs,
    sub,
    tag,
    text,
    yes,
)

MAX_XML_BYTES = 1024 * 1024
DEFAULT_MAX_MEMORY_KIB = 16 * 1024**3  # 16 TiB
_tag, _kids, _first, _text = tag, kids, first, text


def _int(value: str | None, what: str) -> int | None:
    return integer(value, what)


def _yes(value: str | None, what: str) -> bool | None:
    return yes(value, what)


def _kib(elem: Any, max_kib: int, value: str | None = None) -> int:
    """libvirt's virScaleInteger: b, bytes, k, KiB (1024), KB (1000) ... E; KiB by default.
    The size is the element's text, or `value` (an attribute) when given."""
    what, unit = elem.tag, elem.get("unit", "KiB")
    text = (elem.text if value is None else value) or ""
    text = text.strip()
    m = re.fullmatch(r"(b|bytes)|([kmgtpe])(ib|b)?", unit.lower())
    check(m is not None, f"<{what}> unit {unit!r} is unknown")
    assert m is not None
    scale = 1 if m[1] else (1000 if m[3] == "b" else 1024) ** ("kmgtpe".index(m[2]) + 1)
    check(bool(re.fullmatch(r"[0-9]{1,24}", text)), f"<{what}> {text!r} is not a size")
    kib = -(-int(text) * scale // 1024)
    check(kib <= max_kib, f"<{what}> {kib} KiB exceeds the limit of {max_kib} KiB")
    return kib


def parse_domain_xml(
    text: str | bytes,
    *,
    allow_qemu_commandline: bool = False,
    max_memory_kib: int = DEFAULT_MAX_MEMORY_KIB,
    live: bool = False,
) -> DomainDef:
    """Parse domain XML into a validated DomainDef; `live` keeps runtime values (status files)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    check(len(data) <= MAX_XML_BYTES, f"domain XML is larger than {MAX_XML_BYTES} bytes")
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError("domain XML is not UTF-8") from None
    check("\x00" not in decoded, "domain XML contains a NUL character")
    if "<!DOCTYPE" in decoded or "<!ENTITY" in decoded:
        raise InvalidInputError("entity declarations are not allowed (domain XML has a DOCTYPE)")
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
        huge_tree=False, remove_comments=True, remove_pis=True, encoding="utf-8",
    )  # fmt: skip
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise InvalidInputError(one_line(f"malformed domain XML: {exc}")) from None
    check(_tag(root) == "domain", f"the root element must be <domain>, not <{_tag(root)}>")
    k = _kids(
        root,
        "name uuid title description memory currentMemory vcpu os features cpu clock pm "
        "on_poweroff on_reboot on_crash devices qemu:commandline",
        ignored="metadata resource seclabel",
    )
    check(root.get("type") is not None, "domain type attribute is missing")
    check(bool(_text(k, "name")), "domain <name> is missing")
    check("memory" in k, "domain <memory> is missing")
    os_elem = _first(k, "os")
    check(os_elem.get("firmware") is None, "os firmware autoselection is not supported: "
          "name the <loader> and <nvram>", UnsupportedError)
    vcpu = _first(k, "vcpu")
    os_ = _kids(os_elem, "type loader nvram kernel initrd cmdline bootmenu smbios", multi="boot")
    check(_first(os_, "smbios").get("mode", "emulate") == "emulate",
          f"os smbios mode {_first(os_, 'smbios').get('mode')!r} is not supported (emulate)",
          UnsupportedError)
    menu = _first(os_, "bootmenu")
    ostype = _first(os_, "type")
    dev = _kids(
        _first(k, "devices"),
        "emulator memballoon",
        multi="disk serial console graphics video interface channel input controller rng "
        "watchdog audio",
    )
    f: dict[str, Any] = {
        "name": _text(k, "name"),
        "uuid": _text(k, "uuid") or str(uuidlib.uuid4()),
        "type": root.get("type"),
        "title": _text(k, "title"),
        "description": k["description"][0].text if "description" in k else None,
        "memory_kib": _kib(k["memory"][0], max_memory_kib),
        "vcpus": _int(vcpu.text or "", "<vcpu>") if "vcpu" in k else 1,
        "vcpus_current": _int(vcpu.get("current"), "<vcpu> current"),
        "os_type": (ostype.text or "hvm").strip(),
        "arch": ostype.get("arch", "x86_64"),
        "machine": ostype.get("machine", "pc"),
        "boot_devices": tuple(b.get("dev") for b in os_.get("boot", ())),
        "kernel": _text(os_, "kernel") or None,
        "initrd": _text(os_, "initrd") or None,
        "cmdline": os_["cmdline"][0].text or "" if "cmdline" in os_ else None,
        "firmware": parse_firmware(os_),
        "boot_menu": _yes(menu.get("enable"), "os bootmenu enable"),
        "boot_menu_timeout_ms": _int(menu.get("timeout"), "os bootmenu timeout"),
        "emulator": _text(dev, "emulator") or DEFAULT_EMULATOR,
        "disks": tuple(_disk(e) for e in dev.get("disk", ())),
        "graphics": tuple(_graphics(e, live) for e in dev.get("graphics", ())),
        "videos": tuple(parse_video(e) for e in dev.get("video", ())),
        "memballoon": _first(dev, "memballoon").get("model", "virtio"),
        "interfaces": tuple(parse_interface(e, live) for e in dev.get("interface", ())),
        "channels": parse_channels(dev.get("channel", []), live),
        "inputs": tuple(parse_input(e) for e in dev.get("input", ())),
        "controllers": parse_controllers(dev.get("controller", [])),
        "rngs": tuple(parse_rng(e) for e in dev.get("rng", ())),
        "watchdogs": tuple(parse_watchdog(e) for e in dev.get("watchdog", ())),
        "audios": tuple(parse_audio(e) for e in dev.get("audio", ())),
    }
    refuse_attrs(_first(dev, "memballoon"), "memballoon", autodeflate=("off",),
                 freePageReporting=("off",))
    balloon = _kids(_first(dev, "memballoon"), "address", "alias stats")
    f["memballoon_address"] = pci_address(balloon, "memballoon")
    if "currentMemory" in k:
        f["current_memory_kib"] = _kib(k["currentMemory"][0], max_memory_kib)
    per_device = any(x.boot_order for x in (*f["disks"], *f["interfaces"]))
    if not f["boot_devices"] and not per_device and f["kernel"] is None:
        f["boot_devices"] = ("hd",)
    if "features" in k:
        found = _kids(k["features"][0], " ".join(FEATURES) + " vmport")
        refuse_attrs(_first(found, "apic"), "features apic", eoi=())
        f["features"] = tuple(name for name in found if name != "vmport")
        f["vmport"] = _yes(_first(found, "vmport").get("state"), "features vmport state")
    for action in ("on_poweroff", "on_reboot", "on_crash"):
        if action in k:
            f[action] = _text(k, action)
    if "cpu" in k:
        f.update(parse_cpu(k["cpu"][0]))
        f.update(_numa(k["cpu"][0], f, max_memory_kib))
    pm = _kids(_first(k, "pm"), "suspend-to-mem suspend-to-disk")
    for what in ("mem", "disk"):
        f[f"suspend_to_{what}"] = _yes(_first(pm, f"suspend-to-{what}").get("enabled"),
                                       f"pm suspend-to-{what} enabled")
    clock = _first(k, "clock")
    f["clock_offset"] = clock.get("offset", "utc")
    for t in _kids(clock, "", multi="timer").get("timer", ()):
        refuse_attrs(t, f"clock timer {t.get('name')}", track=(), frequency=(), mode=())
    f["timers"] = tuple(
        Timer(
            name=t.get("name"),
            tickpolicy=t.get("tickpolicy"),
            present=_yes(t.get("present"), "timer present"),
        )
        for t in _kids(clock, "", multi="timer").get("timer", ())
    )
    f["serials"], f["consoles"] = _serials(dev, live)
    if "qemu:commandline" in k:
        check(
            allow_qemu_commandline,
            "<qemu:commandline> is not allowed on this host (FERRY_ALLOW_QEMU_COMMANDLINE)",
            UnsupportedError,
        )
        args = _kids(k["qemu:commandline"][0], "", multi="qemu:arg").get("qemu:arg", ())
        f["qemu_args"] = tuple(a.get("value", "") for a in args)
    return DomainDef(**f)


def _numa(cpu: Any, f: dict[str, Any], max_kib: int) -> dict[str, Any]:
    """The NUMA cells of ``<cpu>``; as libvirt, the guest's memory is then their sum
    (and currentMemory at most that)."""
    numa = cpu.find("numa")
    if numa is None:
        return {}
    found = _kids(numa, "", multi="cell").get("cell", ())
    cells = tuple(parse_numa_cell(c, _kib(c, max_kib, c.get("memory", "0")), i)
                  for i, c in enumerate(found))
    check(bool(cells), "cpu <numa> needs at least one <cell>")
    total = sum(c.memory_kib for c in cells)
    check(total <= max_kib, f"cpu numa cells add up to {total} KiB, over the limit of "
          f"{max_kib} KiB")
    current = min(f.get("current_memory_kib") or total, total)
    return {"numa": cells, "memory_kib": total, "current_memory_kib": current}


def _disk(e: Any) -> Disk:
    kind = e.get("type", "file")
    check(kind in ("file", "block"), f"disk type {kind!r} is not supported (file or block)",
          UnsupportedError)  # before its children, which other types have
    k = _kids(e, "driver source target readonly shareable boot serial address",
              "alias backingStore")
    drv, tgt = _first(k, "driver"), _first(k, "target")
    _kids(tgt, "")
    check_enums("disk ", ("driver name", drv.get("name", "qemu"), ("qemu",)))
    refuse_attrs(drv, "disk driver", queues=(), iothread=(), packed=(), ats=(), iommu=(),
                 rerror_policy=(), event_idx=("on",))
    refuse_attrs(e, "disk", model=("virtio",))
    refuse_attrs(tgt, "disk target", rotation_rate=(), removable=("off",), tray=("closed",))
    check(bool(tgt.get("dev")), "disk <target dev> is missing")
    bus = {"vd": "virtio", "hd": "ide", "sd": "scsi"}.get(tgt.get("dev")[:2], "virtio")
    _same_drive_address(k, tgt.get("dev"), tgt.get("bus"))
    return Disk(
        target=tgt.get("dev"),
        bus=tgt.get("bus", bus),
        source=_first(k, "source").get("dev" if kind == "block" else "file"),
        kind=kind,
        device=e.get("device", "disk"),
        format=drv.get("type", "raw"),
        cache=drv.get("cache"),
        io=drv.get("io"),
        discard=drv.get("discard"),
        detect_zeroes=drv.get("detect_zeroes"),
        error_policy=drv.get("error_policy"),
        readonly="readonly" in k,
        shareable="shareable" in k,
        serial=_text(k, "serial"),
        boot_order=_int(_first(k, "boot").get("order"), "disk boot order"),
        address=pci_address(k, f"disk {tgt.get('dev')}", ("drive",)),
        drive=drive_address(k, f"disk {tgt.get('dev')}") if tgt.get("bus", bus) == "scsi"
        else None,
    )


def _same_drive_address(k: Kids, target: str, bus: str | None) -> None:
    """An IDE or SATA disk's ``<address type='drive'>`` must say what its target dev
    says (libvirt would place the disk by the address; ferry places it by the name)."""
    e = _first(k, "address")
    if e.get("type") != "drive" or (bus or {"hd": "ide", "sd": "scsi"}.get(target[:2])) \
            not in ("ide", "sata"):
        return
    i = ord(target[-1]) - ord("a")
    want = (0, i // 2, 0, i % 2) if target.startswith("hd") else (0, 0, 0, i)
    got = tuple(_int(e.get(what, "0"), f"disk {target} drive {what}")
                for what in ("controller", "bus", "target", "unit"))
    show = ":".join(map(str, got))
    check(got == want, f"disk {target} drive address {show} is not where its target dev "
          f"puts it ({':'.join(map(str, want))})", UnsupportedError)


def _chardev(e: Any, port: int, live: bool) -> Serial:
    k = _kids(e, "source target", "alias address")
    src, kind = _first(k, "source"), e.get("type", "pty")
    return Serial(
        type=kind,
        port=port,
        path=None if kind == "pty" and not live else src.get("path"),
        mode=src.get("mode", "connect") if kind == "unix" else None,
        append=_yes(src.get("append"), "serial source append") if kind == "file" else None,
    )


def _serials(dev: Kids, live: bool) -> tuple[tuple[Serial, ...], tuple[Console, ...]]:
    serials: list[Serial] = []
    for e in dev.get("serial", ()):
        tgt = _first(_kids(e, "source target", "alias address"), "target")
        check_enums("serial target ", ("type", tgt.get("type", "isa-serial"), ("isa-serial",)))
        for model in _kids(tgt, "model").get("model", ()):
            check_enums("serial target ", ("model name", model.get("name"), ("isa-serial",)))
        port = _int(tgt.get("port"), "serial target port")
        if port is None:  # libvirt: the lowest free port
            port = min(set(range(4)) - {s.port for s in serials}, default=4)
        serials.append(_chardev(e, port, live))
    consoles: list[Console] = []
    for e in dev.get("console", ()):
        tgt = _first(_kids(e, "source target", "alias address"), "target")
        _kids(tgt, "")
        port = _int(tgt.get("port", "0"), "console target port") or 0
        con = Console(target_type=tgt.get("type", "serial"), port=port)
        if con.target_type == "serial" and not any(s.port == port for s in serials):
            serials.append(_chardev(e, port, live))
        consoles.append(con)
    return tuple(serials), tuple(consoles)


def _graphics(e: Any, live: bool) -> Graphics:
    listen = e.get("listen")
    for item in _kids(e, "", "image", multi="listen").get("listen", ()):
        kind = item.get("type", "address")
        check(
            kind == "address", f"graphics listen type {kind!r} is not supported", UnsupportedError
        )
        listen = item.get("address") or listen
    port, tls = _int(e.get("port"), "graphics port"), _int(e.get("tlsPort"), "graphics tlsPort")
    auto = e.get("autoport") == "yes" or (e.get("autoport") is None and port in (None, -1))
    return Graphics(
        type=e.get("type"),
        port=None if port == -1 or (auto and not live) else port,
        autoport=auto,
        tls_port=None if tls == -1 else tls,
        listen=listen,
        passwd=e.get("passwd"),
    )


# ---------------------------------------------------------------- formatting


_sub, _onoff = sub, onoff


def format_domain_xml(d: DomainDef, *, live: bool = False, migratable: bool = False,
                      secure: bool = True) -> str:
    """The domain XML of `d`; see workers/domain.py's docstring for the flags."""
    live = live and not migratable
    elem = _element(d if live else d.inactive(), live, secure)
    return str(etree.tostring(elem, pretty_print=True, encoding="unicode"))


def _element(d: DomainDef, live: bool, secure: bool) -> Any:
    root = etree.Element(
        "domain", {"type": d.type}, nsmap={"qemu": QEMU_NS} if d.qemu_args else None
    )
    for what in ("name", "uuid", "title", "description"):
        if getattr(d, what) is not None:
            _sub(root, what, getattr(d, what))
    _sub(root, "memory", str(d.memory_kib), unit="KiB")
    _sub(root, "currentMemory", str(d.current_memory_kib), unit="KiB")
    _sub(root, "vcpu", str(d.vcpus), current=d.vcpus_current)
    os_ = _sub(root, "os")
    _sub(os_, "type", d.os_type, arch=d.arch, machine=d.machine)
    put_os_boot(os_, d)
    for dev in d.boot_devices:
        _sub(os_, "boot", dev=dev)
    if d.features or d.vmport is not None:
        feats = _sub(root, "features")
        for name in d.features:
            _sub(feats, name)
        _sub(feats, "vmport", state=_onoff(d.vmport), when=d.vmport is not None)
    put_cpu(root, d)
    if d.suspend_to_mem is not None or d.suspend_to_disk is not None:
        pm = _sub(root, "pm")
        for what in ("mem", "disk"):
            flag = getattr(d, f"suspend_to_{what}")
            _sub(pm, f"suspend-to-{what}", enabled=_onoff(flag, "yes", "no"),
                 when=flag is not None)
    clock = _sub(root, "clock", offset=d.clock_offset)
    for t in d.timers:
        _sub(
            clock,
            "timer",
            name=t.name,
            tickpolicy=t.tickpolicy,
            present=_onoff(t.present, "yes", "no"),
        )
    for action in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(root, action, getattr(d, action))
    devices = _sub(root, "devices")
    _sub(devices, "emulator", d.emulator)
    for disk in d.disks:
        e = _sub(devices, "disk", type=disk.kind, device=disk.device)
        _sub(e, "driver", name="qemu", type=disk.format, cache=disk.cache, io=disk.io,
             discard=disk.discard, detect_zeroes=disk.detect_zeroes,
             error_policy=disk.error_policy)
        if disk.source is not None:
            _sub(e, "source").set("dev" if disk.kind == "block" else "file", disk.source)
        _sub(e, "target", dev=disk.target, bus=disk.bus)
        for flag in ("readonly", "shareable"):
            _sub(e, flag, when=getattr(disk, flag))
        _sub(e, "serial", disk.serial, when=disk.serial is not None)
        _sub(e, "boot", order=disk.boot_order, when=disk.boot_order is not None)
        _sub(e, "alias", name=disk.alias, when=live)
        put_address(e, disk.address)
        put_drive_address(e, disk.drive)
    put_devices(devices, d, live)
    mirrored = [s for c in d.consoles for s in d.serials if s.port == c.port]
    for kind, s in [("serial", s) for s in d.serials] + [("console", s) for s in mirrored]:
        tty = s.path if kind == "console" and s.type == "pty" else None
        e = _sub(devices, kind, type=s.type, tty=tty)
        if s.path is not None:
            _sub(e, "source", mode=s.mode, path=s.path, append=_onoff(s.append))
        _sub(e, "target", type="isa-serial" if kind == "serial" else "serial", port=s.port)
        _sub(e, "alias", name=s.alias, when=live)
    for g in d.graphics:
        e = _sub(
            devices,
            "graphics",
            type=g.type,
            port=g.port,
            autoport=_onoff(g.autoport, "yes", "no"),
            tlsPort=g.tls_port,
            listen=g.listen,
            passwd=g.passwd if secure else None,
        )
        _sub(e, "listen", type="address", address=g.listen, when=g.listen is not None)
    put_late_devices(devices, d, live)
    e = _sub(devices, "memballoon", model=d.memballoon)
    _sub(e, "alias", name="balloon0", when=live and d.memballoon != "none")
    put_address(e, d.memballoon_address)
    if d.qemu_args:
        cmd = _sub(root, f"{{{QEMU_NS}}}commandline")
        for arg in d.qemu_args:
            _sub(cmd, f"{{{QEMU_NS}}}arg", value=arg)
    return root
