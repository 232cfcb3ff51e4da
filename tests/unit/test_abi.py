"""The ABI check: host-side details may differ between two definitions, guest-visible ones not."""

from __future__ import annotations

import re

import pytest

from workers.abi import abi_diff, check_abi_stability
from workers.domain import DomainDef
from workers.domain_xml import parse_domain_xml
from workers.errors import InvalidInputError

BASE = """<domain type='kvm'>
  <name>web-1</name>
  <uuid>dcf47dbd-46d1-4d5b-b442-262a806a333a</uuid>
  <title>Web server</title>
  <description>serves the web</description>
  <memory unit='MiB'>128</memory>
  <currentMemory unit='MiB'>128</currentMemory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <clock offset='utc'><timer name='rtc' tickpolicy='catchup'/></clock>
  <on_reboot>restart</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/srv/images/web-1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/iso/install.iso'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <serial type='file'>
      <source path='/var/log/ferry/web-1.log'/>
      <target port='0'/>
    </serial>
    <graphics type='vnc' port='5901' autoport='no' listen='127.0.0.1'/>
    <video><model type='vga'/></video>
  </devices>
</domain>
"""

SOURCE = parse_domain_xml(BASE)


def changed(*edits: tuple[str, str]) -> DomainDef:
    """BASE with each (old, new) text edit made; each old text must occur exactly once."""
    text = BASE
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return parse_domain_xml(text)


def refusal(target: DomainDef) -> str:
    with pytest.raises(InvalidInputError) as info:
        check_abi_stability(SOURCE, target)
    message = str(info.value)
    assert "\n" not in message
    assert message == abi_diff(SOURCE, target)[0]
    return message


def accepts(target: DomainDef) -> None:
    assert abi_diff(SOURCE, target) == []
    check_abi_stability(SOURCE, target)


def test_an_identical_definition_is_accepted() -> None:
    accepts(parse_domain_xml(BASE))


def test_a_different_disk_source_path_is_accepted() -> None:
    accepts(changed(("/srv/images/web-1.qcow2", "/mnt/shared/images/web-1.qcow2")))


def test_a_different_graphics_listen_address_and_port_are_accepted() -> None:
    accepts(changed(("port='5901' autoport='no' listen='127.0.0.1'", "port='5907' listen='::1'")))


def test_a_graphics_autoport_on_the_target_is_accepted() -> None:
    accepts(changed(("port='5901' autoport='no'", "autoport='yes'")))


def test_a_different_serial_log_path_is_accepted() -> None:
    accepts(changed(("/var/log/ferry/web-1.log", "/var/log/ferry/dst/web-1.log")))


def test_a_pty_serial_in_place_of_a_file_serial_is_accepted() -> None:
    file_source = "type='file'>\n      <source path='/var/log/ferry/web-1.log'/>"
    accepts(changed((file_source, "type='pty'>")))


def test_a_different_title_and_description_are_accepted() -> None:
    accepts(changed(("Web server", "Moved web server"), ("serves the web", "still serves it")))


def test_a_different_emulator_path_lifecycle_action_and_disk_cache_are_accepted() -> None:
    accepts(
        changed(
            ("/usr/bin/qemu-system-x86_64", "/opt/qemu/bin/qemu-system-x86_64"),
            ("<on_reboot>restart</on_reboot>", "<on_reboot>destroy</on_reboot>"),
            ("cache='none'", "cache='writeback' discard='unmap'"),
        )
    )


def test_more_vcpus_are_refused_naming_vcpus() -> None:
    message = refusal(changed(("<vcpu>2</vcpu>", "<vcpu>4</vcpu>")))
    assert message == "target domain vcpus 4 does not match source 2"


def test_fewer_current_vcpus_are_refused_naming_current_vcpus() -> None:
    message = refusal(changed(("<vcpu>2</vcpu>", "<vcpu current='1'>2</vcpu>")))
    assert message == "target domain current vcpus 1 does not match source 2"


def test_more_memory_is_refused_naming_memory_in_kib() -> None:
    message = refusal(changed(("<memory unit='MiB'>128", "<memory unit='MiB'>256")))
    assert message == "target domain memory 262144 KiB does not match source 131072 KiB"


def test_less_current_memory_is_refused_naming_current_memory() -> None:
    message = refusal(changed(("<currentMemory unit='MiB'>128", "<currentMemory unit='MiB'>64")))
    assert message == "target domain currentMemory 65536 KiB does not match source 131072 KiB"


def test_another_machine_type_is_refused() -> None:
    message = refusal(changed(("pc-i440fx-7.2", "pc-i440fx-8.0")))
    assert message == "target domain machine pc-i440fx-8.0 does not match source pc-i440fx-7.2"


def test_a_changed_disk_bus_is_refused_naming_the_disk() -> None:
    message = refusal(changed(("dev='vda' bus='virtio'", "dev='hda' bus='ide'")))
    assert message == "target disk vda bus ide does not match source virtio"


def test_a_changed_disk_target_is_refused_naming_the_disk() -> None:
    message = refusal(changed(("dev='vda'", "dev='vdb'")))
    assert message == "target disk vda target dev vdb does not match source vda"


def test_an_added_disk_is_refused_by_count() -> None:
    extra = "<disk type='file'><source file='/srv/images/data.raw'/><target dev='vdb'/></disk>"
    message = refusal(changed(("<serial", f"{extra}\n    <serial")))
    assert message == "target domain disk count 3 does not match source 2"


def test_another_video_model_is_refused() -> None:
    message = refusal(changed(("<model type='vga'/>", "<model type='qxl'/>")))
    assert message == "target video[0] model qxl does not match source vga"


def test_another_uuid_is_refused() -> None:
    message = refusal(changed(("262a806a333a", "262a806a333b")))
    assert message == (
        "target domain uuid dcf47dbd-46d1-4d5b-b442-262a806a333b "
        "does not match source dcf47dbd-46d1-4d5b-b442-262a806a333a"
    )


def test_another_name_is_refused_saying_renaming_is_not_allowed() -> None:
    message = refusal(changed(("<name>web-1</name>", "<name>web-2</name>")))
    assert message.startswith("target domain name web-2 does not match source web-1 (")
    assert "renaming is refused" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("type='kvm'", "type='qemu'", "target domain type qemu does not match source kvm"),
        ("<apic/>", "<pae/>", "target domain feature apic off does not match source on"),
        ("offset='utc'", "offset='localtime'", "clock offset localtime does not match source utc"),
        ("tickpolicy='catchup'", "", "clock timers rtc does not match source rtc(tickpolicy="),
        ("type='qcow2'", "type='raw'", "target disk vda format raw does not match source qcow2"),
        ("<readonly/>", "<readonly/><shareable/>", "disk hdc shareable yes does not match"),
        ("<target port='0'/>", "<target port='1'/>", "serial[0] target port 1 does not match"),
        ("<graphics type='vnc'", "<graphics type='spice'", "graphics[0] type spice does not"),
        ("<video><model type='vga'/></video>", "", "target domain video count 0 does not"),
        ("</devices>", "<memballoon model='none'/></devices>", "memballoon model none does not"),
    ],
    ids=[
        "domain type",
        "a feature",
        "clock offset",
        "clock timers",
        "disk format",
        "disk shareable",
        "serial port",
        "graphics type",
        "no video",
        "memballoon model",
    ],
)
def test_other_guest_visible_changes_are_refused_by_name(old: str, new: str, expected: str) -> None:
    assert expected in refusal(changed((old, new)))


def test_a_serial_console_added_on_the_target_is_refused_by_count() -> None:
    console = "<console type='file'><source path='/var/log/ferry/web-1.log'/></console>"
    message = refusal(changed(("<graphics", f"{console}\n    <graphics")))
    assert message == "target domain console count 1 does not match source 0"


def test_abi_diff_lists_every_difference_and_the_check_raises_the_first() -> None:
    target = changed(
        ("<vcpu>2</vcpu>", "<vcpu>4</vcpu>"),
        ("pc-i440fx-7.2", "pc-i440fx-8.0"),
        ("<model type='vga'/>", "<model type='cirrus'/>"),
    )
    diffs = abi_diff(SOURCE, target)
    assert [re.sub(r" \S+ does not.*", "", d) for d in diffs] == [
        "target domain vcpus",
        "target domain machine",
        "target video[0] model",
    ]
    with pytest.raises(InvalidInputError, match=r"^target domain vcpus 4 does not match source 2$"):
        check_abi_stability(SOURCE, target)
