"""Real-world domain XML nobody here wrote: libvirt's own test definitions.

tests/unit/libvirt_domains/ holds definitions from libvirt's test suite, verbatim
(see its README.md). ferry must take each one whole or refuse it in one line that
names what it does not support; a crash (KeyError, ValueError, ...) or a message
of many lines is a bug. An accepted definition must survive its own XML and give
a QEMU command line, prepared as the host prepares it before QEMU starts (NVRAM
path, autoport ports, channel sockets, tap fds).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from workers.abi import check_abi_stability
from workers.domain import DomainDef, with_channel_paths, with_graphics_ports
from workers.domain_xml import format_domain_xml, parse_domain_xml
from workers.errors import FerryError
from workers.guestfiles import with_nvram_path
from workers.qemu_argv import build_qemu_argv

DOMAINS = Path(__file__).parent / "libvirt_domains"
FILES = sorted(p.name for p in DOMAINS.glob("*.xml"))

# A change in what ferry does with these shows here: "accepted", or a phrase of the refusal.
EXPECTED = {
    "x86_64-q35-graphics.xml": "accepted",
    "x86_64-pc-headless.xml": "accepted",
    "bios-nvram.xml": "accepted",
    "cpu-host-model.xml": "accepted",
    "disk-detect-zeroes.xml": "accepted",
    "q35-virt-manager-basic.xml": "unsupported element <sound> in <devices>",
    "os-firmware-efi.xml": "os firmware autoselection is not supported",
    "disk-network-nbd.xml": "disk type 'network' is not supported",
    "net-vhostuser.xml": "interface type 'vhostuser'",
    "disk-virtio-scsi-reservations.xml": "unsupported element <reservations> in <source>",
    "cpu-numa1.xml": "cpu numa cell 0 memory 109550 KiB is not a positive whole number of MiB",
    "disk-cdrom.xml": "os arch 'i686' is not supported",
    "net-mtu.xml": "unsupported element <mtu> in <interface>",
    "disk-error-policy.xml": "disk driver rerror_policy='ignore' is not supported",
}
MAX_MESSAGE = 200


def _outcome(name: str) -> tuple[DomainDef | None, FerryError | None]:
    try:
        return parse_domain_xml((DOMAINS / name).read_text()), None
    except FerryError as exc:
        return None, exc


def _argv(d: DomainDef) -> list[str]:
    """The command line the host would build: as workers/lifecycle.py prepares `d`."""
    live = with_nvram_path(d, Path("/var/lib/ferry/nvram"))
    live = with_graphics_ports(live, [5900 + i for i, g in enumerate(d.graphics) if g.autoport])
    live = with_channel_paths(live, "/run/ferry")
    taps = {i: (100 + i, None) for i, n in enumerate(d.interfaces) if n.tap}
    return build_qemu_argv(live, qmp_fd=7, kvm=True, taps=taps, spice=True)


def _names_what(message: str) -> bool:
    """A refusal names the thing: an <element>, an attribute=, a quoted value or a
    known element or attribute name."""
    return bool(re.search(r"<[\w:-]+>|\w+=|'[^']*'|\b(cpu|disk|interface|controller|os|"
                          r"memballoon|graphics|channel|video|clock|timer|numa)\b", message))


def test_there_are_enough_real_definitions_to_mean_something() -> None:
    assert 40 <= len(FILES) <= 80
    assert set(EXPECTED) <= set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_every_libvirt_definition_is_accepted_whole_or_refused_in_one_line_naming_what(
        name: str) -> None:
    d, refused = _outcome(name)
    if refused is not None:
        message = str(refused)
        assert "\n" not in message
        assert len(message) <= MAX_MESSAGE, message
        assert _names_what(message), message
        return
    assert d is not None
    assert parse_domain_xml(format_domain_xml(d)) == d
    argv = _argv(d)
    assert argv[0] == d.emulator and f"guest={d.name},debug-threads=on" in argv


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_representative_definitions_keep_their_outcome(name: str) -> None:
    _, refused = _outcome(name)
    if EXPECTED[name] == "accepted":
        assert refused is None, str(refused)
    else:
        assert refused is not None and EXPECTED[name] in str(refused)


def test_an_accepted_definition_keeps_every_device_it_names() -> None:
    d, _ = _outcome("x86_64-q35-graphics.xml")
    assert d is not None
    argv = " ".join(_argv(d))
    for option in ("virtio-blk-pci", "qemu-xhci", "virtio-net-pci", "usb-tablet",
                   "virtserialport", "qxl-vga", "virtio-rng-pci", "-vnc"):
        assert option in argv


# ------------------------------------------------ what these definitions taught

def _one(name: str, old: str, new: str) -> str:
    """A definition of libvirt's with one thing changed (it must be there)."""
    text = (DOMAINS / name).read_text()
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize(("slot", "expected"), [("0x0a", 10), ("0X0A", 10), ("10", 10),
                                                ("010", 8), ("0", 0)])
def test_pci_numbers_read_as_libvirts_strtoul_base_0(slot: str, expected: int) -> None:
    # balloon-device-deflate.xml writes its address in decimal (slot='18')
    text = _one("disk-aio-io_uring.xml", "slot='0x09'", f"slot='{slot}'")
    d = parse_domain_xml(text)
    assert d.disks[0].address is not None and d.disks[0].address.slot == expected


def test_a_pci_number_with_a_leading_zero_and_an_eight_is_refused_not_a_crash() -> None:
    with pytest.raises(FerryError, match="disk vda pci slot '08' is not an integer"):
        parse_domain_xml(_one("disk-aio-io_uring.xml", "slot='0x09'", "slot='08'"))


@pytest.mark.parametrize(("old", "new", "refusal"), [
    ("tickpolicy='discard'", "tickpolicy='discard'", "clock timer pit tickpolicy='discard'"),
    ("tickpolicy='discard'", "present='no'", "clock timer pit present='no'"),
    ("name='pit' tickpolicy='discard'", "name='hypervclock' present='yes'",
     "clock timer hypervclock present='yes'"),
    ("name='pit' tickpolicy='discard'", "name='rtc' tickpolicy='merge'",
     "clock timer rtc tickpolicy='merge'"),
])
def test_a_timer_setting_ferry_would_drop_is_refused_naming_it(old: str, new: str,
                                                               refusal: str) -> None:
    # kvm-pit-discard.xml: the PIT's lost ticks discarded; ferry's QEMU would delay them
    text = _one("kvm-pit-discard.xml", "arch='i686'", "arch='x86_64'")
    with pytest.raises(FerryError, match=re.escape(refusal)):
        parse_domain_xml(text.replace(old, new))


def test_the_timers_ferry_acts_on_or_leaves_at_qemus_default_are_accepted() -> None:
    text = _one("kvm-pit-discard.xml", "arch='i686'", "arch='x86_64'").replace(
        "<timer name='pit' tickpolicy='discard'/>",
        "<timer name='pit' tickpolicy='delay'/><timer name='rtc' tickpolicy='catchup'/>"
        "<timer name='hpet' present='no'/><timer name='kvmclock' present='yes'/>"
        "<timer name='hypervclock' present='no'/>")
    assert len(parse_domain_xml(text).timers) == 5


@pytest.mark.parametrize(("name", "old", "new", "refusal"), [
    ("net-mtu.xml", "event_idx='on'", "event_idx='off'", "disk driver event_idx='off'"),
    ("disk-aio-io_uring.xml", "<disk type='block' device='disk'>",
     "<disk type='block' device='disk' model='virtio-transitional'>",
     "disk model='virtio-transitional'"),
    ("x86_64-q35-graphics.xml", '<input type="tablet" bus="usb"/>',
     "<input type='tablet' bus='virtio' model='virtio-non-transitional'/>",
     "input tablet model='virtio-non-transitional'"),
    ("x86_64-q35-graphics.xml", "<apic/>", "<apic eoi='on'/>", "features apic eoi='on'"),
    ("bios-nvram.xml", "<loader readonly='yes' type='pflash'>",
     "<loader readonly='yes' type='pflash' format='qcow2'>", "os loader format='qcow2'"),
    ("bios-nvram.xml", "<loader readonly='yes' type='pflash'>",
     "<loader readonly='yes' type='pflash' stateless='yes'>", "os loader stateless='yes'"),
    ("cpu-numa-disjoint.xml", "<topology sockets='2' cores='4' threads='2'/>",
     "<topology sockets='2' clusters='2' cores='2' threads='2'/>",
     "cpu topology clusters='2'"),
    ("x86_64-q35-graphics.xml", "<controller type=\"usb\" index=\"0\" model=\"qemu-xhci\" "
     "ports=\"15\"/>", "<controller type='virtio-serial'><driver iommu='on'/></controller>",
     "controller virtio-serial driver iommu='on'"),
    ("usb-controller-default-q35.xml", "<controller type='pci' index='0' model='pcie-root'/>",
     "<controller type='pci' index='0' model='pcie-root'/><controller type='pci' index='1' "
     "model='pcie-root-port'><model name='x3130-upstream'/></controller>",
     "controller pci 1 model name 'x3130-upstream' is not one of pcie-root-port, ioh3420"),
    ("x86_64-q35-graphics.xml", '<controller type="usb" index="0" model="qemu-xhci" '
     'ports="15"/>', "<controller type='virtio-serial' index='1'/>",
     "controller virtio-serial 1 is not supported (index 0 only)"),
])
def test_a_guest_visible_setting_ferry_would_drop_is_refused_naming_it(
        name: str, old: str, new: str, refusal: str) -> None:
    text = _one(name, old, new).replace("arch='i686'", "arch='x86_64'")
    with pytest.raises(FerryError, match=re.escape(refusal)):
        parse_domain_xml(text.replace("qemu-system-i386", "qemu-system-x86_64"))


def test_the_values_of_those_settings_that_change_nothing_are_accepted() -> None:
    text = _one("x86_64-q35-graphics.xml", "<apic/>", "<apic/><vmport state='off'/>")
    text = text.replace('<disk type="file" device="disk">',
                        "<disk type='file' device='disk' model='virtio'>")
    text = text.replace('<driver name="qemu" type="qcow2"/>',
                        "<driver name='qemu' type='qcow2' event_idx='on'/>")
    text = text.replace('<input type="tablet" bus="usb"/>',
                        "<input type='tablet' bus='virtio' model='virtio'/>")
    d = parse_domain_xml(text)
    assert [i.bus for i in d.inputs] == ["virtio"] and d.disks[0].format == "qcow2"


IOH3420_PORT = ("<controller type='pci' index='1' model='pcie-root-port'>"
                "<model name='ioh3420'/><target chassis='1' port='0x10'/>"
                "<address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>"
                "</controller>")


def test_an_older_q35_guests_ioh3420_root_port_is_kept_in_its_xml_argv_and_abi() -> None:
    """libvirt wrote Intel's ioh3420 for q35 root ports before QEMU's generic one."""
    text = _one("usb-controller-default-q35.xml",
                "<controller type='pci' index='0' model='pcie-root'/>",
                "<controller type='pci' index='0' model='pcie-root'/>" + IOH3420_PORT)
    d = parse_domain_xml(text)
    [port] = [c for c in d.controllers if c.model == "pcie-root-port"]
    assert port.device == "ioh3420"
    assert parse_domain_xml(format_domain_xml(d)) == d
    assert "<model name=\"ioh3420\"" in format_domain_xml(d).replace("'", '"')
    assert "ioh3420,port=0x10,chassis=1,id=pci.1,bus=pcie.0,addr=0x2" in _argv(d)
    generic = parse_domain_xml(text.replace("<model name='ioh3420'/>", ""))
    assert "pcie-root-port,port=0x10,chassis=1,id=pci.1,bus=pcie.0,addr=0x2" in _argv(generic)
    with pytest.raises(FerryError, match=r"controller\[\d\] device .*ioh3420"):
        check_abi_stability(d, generic)
