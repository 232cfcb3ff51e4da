"""The QEMU command line is a pure function of the definition: same XML, same device tree."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from workers.devices import Video
from workers.domain import DomainDef, Graphics, with_graphics_ports
from workers.domain_xml import format_domain_xml, parse_domain_xml
from workers.errors import InvalidInputError, UnsupportedError
from workers.qemu_argv import build_qemu_argv, qemu_escape, qemu_has_spice

UUID = "6f1c0f4e-3c2b-4a41-9d55-0a4f2a9b7e10"

TYPICAL = f"""<domain type='kvm'>
  <name>web1</name>
  <uuid>{UUID}</uuid>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <cpu mode='host-passthrough'/>
  <clock offset='utc'/>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/images/web,1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/images/install.iso'/>
      <target dev='hdc' bus='ide'/>
    </disk>
    <serial type='file'><source path='/logs/web1,serial.log'/><target port='0'/></serial>
    <serial type='pty'><target port='1'/></serial>
    <serial type='unix'><source mode='bind' path='/run/web1.sock'/><target port='2'/></serial>
    <console type='file'><target type='serial' port='0'/></console>
    <graphics type='vnc' autoport='yes' listen='0.0.0.0'/>
    <video><model type='vga'/></video>
    <memballoon model='virtio'/>
  </devices>
</domain>"""


def typical() -> DomainDef:
    return with_graphics_ports(parse_domain_xml(TYPICAL), [5907])


def argv_of(d: DomainDef, **kw: object) -> list[str]:
    args: dict[str, object] = {"qmp_fd": 7, "pidfile": "/run/ferry/web1.pid", "kvm": True}
    args.update(kw)
    return build_qemu_argv(d, **args)  # type: ignore[arg-type]


def pairs(argv: list[str]) -> list[tuple[str, str]]:
    """(option, value) for every option that takes a value, in order."""
    return [(a, b) for a, b in itertools.pairwise(argv) if a.startswith("-")]


def values(argv: list[str], option: str) -> list[str]:
    return [v for o, v in pairs(argv) if o == option]


def test_the_argv_for_a_typical_guest_is_exactly_this() -> None:
    assert argv_of(typical()) == [
        "/usr/bin/qemu-system-x86_64",
        "-name", "guest=web1,debug-threads=on",
        "-S",
        "-uuid", UUID,
        "-machine", "pc,accel=kvm:tcg",
        "-cpu", "host,arch-capabilities=off",
        "-m", "size=524288k",
        "-smp", "2",
        "-no-user-config", "-nodefaults", "-display", "none",
        "-chardev", "socket,id=charmonitor,fd=7,server=on,wait=off",
        "-mon", "chardev=charmonitor,id=monitor,mode=control",
        "-pidfile", "/run/ferry/web1.pid",
        "-rtc", "base=utc",
        "-boot", "order=c",
        "-device", "VGA,id=video0",
        "-drive", "file=/images/web,,1.qcow2,format=qcow2,if=none,id=drive-virtio-disk0,cache=none",
        "-device", "virtio-blk-pci,drive=drive-virtio-disk0,id=virtio-disk0",
        "-drive", "file=/images/install.iso,format=raw,if=none,id=drive-ide0-1-0,media=cdrom,"
        "readonly=on",
        "-device", "ide-cd,bus=ide.1,unit=0,drive=drive-ide0-1-0,id=ide0-1-0",
        "-chardev", "file,id=charserial0,path=/logs/web1,,serial.log",
        "-device", "isa-serial,chardev=charserial0,id=serial0,index=0",
        "-chardev", "pty,id=charserial1",
        "-device", "isa-serial,chardev=charserial1,id=serial1,index=1",
        "-chardev", "socket,id=charserial2,path=/run/web1.sock,server=on,wait=off",
        "-device", "isa-serial,chardev=charserial2,id=serial2,index=2",
        "-vnc", "0.0.0.0:7",
        "-device", "virtio-balloon-pci,id=balloon0",
    ]  # fmt: skip


def test_both_ends_of_a_migration_build_the_same_argv_from_the_migratable_xml() -> None:
    source = typical()
    dest = with_graphics_ports(parse_domain_xml(format_domain_xml(source, migratable=True)), [5907])
    assert argv_of(dest, incoming="defer") == [*argv_of(source), "-incoming", "defer"]


def test_without_kvm_the_guest_runs_on_tcg_with_the_max_cpu() -> None:
    argv = argv_of(typical(), kvm=False)
    assert values(argv, "-machine") == ["pc,accel=tcg"]
    assert values(argv, "-cpu") == ["max"]


def test_a_qemu_type_domain_uses_tcg_even_where_kvm_works() -> None:
    d = dataclasses.replace(typical(), type="qemu")
    assert values(argv_of(d), "-machine") == ["pc,accel=tcg"]


@pytest.mark.parametrize(
    "mode, model, cpu",
    [
        (None, None, []),
        ("custom", "Nehalem", ["Nehalem,enforce"]),
        ("host-model", None, ["host,arch-capabilities=off"]),
    ],
)
def test_the_cpu_follows_the_cpu_mode(mode: str | None, model: str | None, cpu: list[str]) -> None:
    d = dataclasses.replace(typical(), cpu_mode=mode, cpu_model=model)
    assert values(argv_of(d), "-cpu") == cpu


def test_machine_options_follow_features_and_timers() -> None:
    xml = TYPICAL.replace("<features><acpi/><apic/></features>", "").replace(
        "<clock offset='utc'/>",
        "<clock offset='localtime'><timer name='hpet' present='no'/>"
        "<timer name='rtc' tickpolicy='catchup'/></clock>",
    )
    argv = argv_of(with_graphics_ports(parse_domain_xml(xml), [5907]))
    assert values(argv, "-machine") == ["pc,accel=kvm:tcg,acpi=off,hpet=off"]
    assert values(argv, "-rtc") == ["base=localtime,driftfix=slew"]


def test_memory_is_rounded_up_to_whole_mebibytes_and_current_vcpus_become_maxcpus() -> None:
    d = dataclasses.replace(typical(), memory_kib=1000, current_memory_kib=1000)
    d = dataclasses.replace(d, vcpus=4, vcpus_current=2)
    argv = argv_of(d)
    assert values(argv, "-m") == ["size=1024k"]
    assert values(argv, "-smp") == ["2,maxcpus=4"]


def test_lifecycle_actions_map_to_no_reboot_and_no_shutdown() -> None:
    assert "-no-reboot" not in argv_of(typical()) and "-no-shutdown" not in argv_of(typical())
    d = dataclasses.replace(typical(), on_reboot="destroy", on_poweroff="preserve")
    assert "-no-reboot" in argv_of(d) and "-no-shutdown" in argv_of(d)


def test_a_per_device_boot_order_becomes_bootindex_and_strict_boot() -> None:
    disks = typical().disks
    d = dataclasses.replace(
        typical(),
        boot_devices=(),
        disks=(disks[0], dataclasses.replace(disks[1], boot_order=1)),
    )
    argv = argv_of(d)
    assert values(argv, "-boot") == ["strict=on"]
    assert "ide-cd,bus=ide.1,unit=0,drive=drive-ide0-1-0,id=ide0-1-0,bootindex=1" in argv


def test_os_boot_devices_become_a_boot_order() -> None:
    d = dataclasses.replace(typical(), boot_devices=("cdrom", "hd", "network"))
    assert values(argv_of(d), "-boot") == ["order=dcn"]


def test_disk_driver_options_reach_the_drive() -> None:
    xml = TYPICAL.replace(
        "<driver name='qemu' type='qcow2' cache='none'/>",
        "<driver name='qemu' type='raw' cache='default' discard='unmap' detect_zeroes='unmap'/>",
    ).replace("</disk>", "<shareable/></disk>", 1)
    argv = argv_of(with_graphics_ports(parse_domain_xml(xml), [5907]))
    assert values(argv, "-drive")[0] == (
        "file=/images/web,,1.qcow2,format=raw,if=none,id=drive-virtio-disk0,"
        "discard=unmap,detect-zeroes=unmap"
    )
    assert values(argv, "-device")[1].endswith(",share-rw=on")


def test_detect_zeroes_unmap_without_discard_unmap_is_downgraded_like_libvirt() -> None:
    disk = dataclasses.replace(typical().disks[0], detect_zeroes="unmap")
    argv = argv_of(dataclasses.replace(typical(), disks=(disk,)))
    assert values(argv, "-drive")[0].endswith(",detect-zeroes=on")


def test_an_empty_cdrom_has_a_drive_without_a_file() -> None:
    cdrom = dataclasses.replace(typical().disks[1], source=None)
    argv = argv_of(dataclasses.replace(typical(), disks=(cdrom,)))
    assert values(argv, "-drive") == ["if=none,id=drive-ide0-1-0,media=cdrom,readonly=on"]


def test_commas_in_paths_are_escaped_so_they_cannot_inject_options() -> None:
    evil = "/images/x.img,file.driver=ssh,file.host=attacker"
    disk = dataclasses.replace(typical().disks[0], source=evil)
    drive = values(argv_of(dataclasses.replace(typical(), disks=(disk,))), "-drive")[0]
    assert drive.startswith("file=/images/x.img,,file.driver=ssh,,file.host=attacker,format=")
    assert qemu_escape("a,b,,c") == "a,,b,,,,c"


def test_the_graphics_password_never_reaches_the_command_line() -> None:
    vnc = dataclasses.replace(typical().graphics[0], passwd="s3cret")
    argv = argv_of(dataclasses.replace(typical(), graphics=(vnc,)))
    assert "s3cret" not in " ".join(argv)
    assert values(argv, "-vnc") == ["0.0.0.0:7,password=on"]


def test_vnc_listens_on_loopback_by_default_and_brackets_ipv6() -> None:
    g = Graphics(type="vnc", port=5900, autoport=False)
    assert values(argv_of(dataclasses.replace(typical(), graphics=(g,))), "-vnc") == ["127.0.0.1:0"]
    g6 = dataclasses.replace(g, listen="::1")
    assert values(argv_of(dataclasses.replace(typical(), graphics=(g6,))), "-vnc") == ["[::1]:0"]


def test_spice_gets_its_port_address_and_seamless_migration() -> None:
    g = Graphics(type="spice", port=5930, autoport=False)
    argv = argv_of(dataclasses.replace(typical(), graphics=(g,)))
    assert values(argv, "-spice") == [
        "port=5930,addr=127.0.0.1,disable-ticketing=on,seamless-migration=on"
    ]
    with_password = dataclasses.replace(g, passwd="pw")
    argv = argv_of(dataclasses.replace(typical(), graphics=(with_password,)))
    assert values(argv, "-spice") == ["port=5930,addr=127.0.0.1,seamless-migration=on"]


def test_spice_on_a_qemu_without_spice_is_unsupported() -> None:
    d = dataclasses.replace(typical(), graphics=(Graphics(type="spice", port=5930),))
    with pytest.raises(UnsupportedError, match="no SPICE support"):
        argv_of(d, spice=False)


def test_spice_tls_is_refused_when_the_definition_is_read_not_at_start() -> None:
    with pytest.raises(UnsupportedError, match="graphics spice tlsPort is not supported"):
        Graphics(type="spice", port=5930, tls_port=5931)
    xml = TYPICAL.replace("<graphics type='vnc'", "<graphics type='spice' tlsPort='5931'")
    assert "tlsPort='5931'" in xml
    with pytest.raises(UnsupportedError, match="graphics spice tlsPort is not supported"):
        parse_domain_xml(xml)


def test_an_autoport_display_without_a_port_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="autoport"):
        argv_of(parse_domain_xml(TYPICAL))


@pytest.mark.parametrize(
    "model, device", [("cirrus", "cirrus-vga"), ("qxl", "qxl-vga"), ("virtio", "virtio-vga")]
)
def test_video_models_map_to_their_qemu_devices(model: str, device: str) -> None:
    argv = argv_of(dataclasses.replace(typical(), videos=(Video(model=model),)))
    assert f"{device},id=video0" in argv


def test_no_video_and_no_balloon_add_no_devices() -> None:
    d = dataclasses.replace(typical(), videos=(Video(model="none"),), memballoon="none")
    devices = values(argv_of(d), "-device")
    assert not any(x.startswith(("VGA", "virtio-balloon")) for x in devices)


def test_incoming_defer_and_migration_uris_are_accepted_but_exec_is_not() -> None:
    assert argv_of(typical(), incoming="defer")[-2:] == ["-incoming", "defer"]
    assert argv_of(typical(), incoming="tcp:0.0.0.0:49152")[-1] == "tcp:0.0.0.0:49152"
    with pytest.raises(InvalidInputError, match="exec:"):
        argv_of(typical(), incoming="exec:cat /tmp/x")


def test_qemu_args_come_last_after_extra() -> None:
    xml = TYPICAL.replace(
        "<domain type='kvm'>",
        "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
    ).replace("</devices>", "</devices><qemu:commandline><qemu:arg value='-snapshot'/>"
              "</qemu:commandline>")  # fmt: skip
    d = with_graphics_ports(parse_domain_xml(xml, allow_qemu_commandline=True), [5907])
    argv = argv_of(d, incoming="defer", extra=["-msg", "timestamp=on"])
    assert argv[-5:] == ["-incoming", "defer", "-msg", "timestamp=on", "-snapshot"]


def test_a_negative_qmp_fd_is_refused() -> None:
    with pytest.raises(ValueError, match="qmp_fd"):
        argv_of(typical(), qmp_fd=-1)


def test_the_spice_probe_says_no_for_a_binary_that_is_not_there() -> None:
    assert qemu_has_spice("/nonexistent/qemu-system-x86_64") is False


def test_kvmclock_timer_off_turns_the_cpu_flag_off_so_kvm_never_writes_guest_memory() -> None:
    xml = """<domain type='kvm'><name>k</name><memory unit='MiB'>64</memory>
      <clock offset='utc'><timer name='kvmclock' present='no'/></clock></domain>"""
    argv = build_qemu_argv(parse_domain_xml(xml), qmp_fd=3, pidfile="/tmp/p", kvm=True)
    assert argv[argv.index("-cpu") + 1] == "qemu64,kvmclock=off"


def test_the_sandbox_denies_spawning_elevating_and_obsolete_calls() -> None:
    argv = argv_of(typical(), sandbox=True)
    assert values(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert "-sandbox" not in argv_of(typical())


def test_without_a_pidfile_qemu_is_not_asked_to_write_one() -> None:
    assert "-pidfile" not in argv_of(typical(), pidfile=None)


def test_serial_files_and_sockets_the_worker_opened_go_in_as_fds() -> None:
    from workers.qemu_argv import Handover

    argv = argv_of(typical(), handover=Handover(serial_files={"serial0": 21},
                                                serial_sockets={"serial2": 22}))
    assert values(argv, "-add-fd") == ["fd=21,set=10,opaque=serial0"]
    chardevs = values(argv, "-chardev")
    assert "file,id=charserial0,path=/dev/fdset/10" in chardevs
    assert "socket,id=charserial2,fd=22,server=on,wait=off" in chardevs
    assert "pty,id=charserial1" in chardevs  # a pty needs nothing opened
