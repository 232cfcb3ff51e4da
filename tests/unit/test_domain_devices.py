"""The devices of a server guest: libvirt's XML in, the model, the XML out, QEMU's argv, the ABI.

libvirt_server.xml is what virt-install writes for a Debian 12 server on q35 with UEFI
(root ports, xhci, virtio-serial with the guest agent channel, tablet, audio none,
virtio video, watchdog, rng, NIC on a network): it must be accepted whole.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from workers.abi import abi_diff
from workers.cpucheck import CpuCaps, cpu_problems
from workers.devices import Controller, CpuFeature, Interface, PciAddress, Topology
from workers.domain import DomainDef, with_channel_paths, with_graphics_ports, with_tap_names
from workers.domain_xml import format_domain_xml, parse_domain_xml
from workers.errors import InvalidInputError, UnsupportedError
from workers.qemu_argv import build_qemu_argv

SERVER = (Path(__file__).parent / "libvirt_server.xml").read_text()
UUID = "8a1c2f3e-9d4b-4c5a-8e7f-1a2b3c4d5e6f"


def server() -> DomainDef:
    return parse_domain_xml(SERVER)


def running(d: DomainDef) -> DomainDef:
    return with_tap_names(with_channel_paths(with_graphics_ports(d, [5905]), "/run/h"),
                          {0: "vnet7"})


def argv_of(d: DomainDef, kvm: bool = False) -> list[str]:
    return build_qemu_argv(running(d), qmp_fd=3, pidfile="/run/h/p", kvm=kvm,
                           taps={0: (9, None)})


def with_devices(devices: str, machine: str = "pc", head: str = "") -> str:
    return (f"<domain type='qemu'><name>t</name><uuid>{UUID}</uuid><memory>65536</memory>"
            f"{head}<os><type machine='{machine}'>hvm</type></os><devices>{devices}</devices>"
            "</domain>")


def test_a_libvirt_written_server_definition_is_accepted_whole() -> None:
    d = server()
    assert d.family == "q35" and d.firmware is not None
    assert d.firmware.nvram == "/var/lib/ferry/nvram/debian12_VARS.fd"
    assert d.cpu_topology == Topology(sockets=1, dies=1, cores=2, threads=1)
    assert [(n.type, n.source, n.mac, n.address) for n in d.interfaces] == [
        ("network", "default", "52:54:00:3c:5e:7a", PciAddress(bus=1, slot=0))]
    assert [(c.type, c.name, c.port, c.path) for c in d.channels] == [
        ("unix", "org.qemu.guest_agent.0", 1, None)]
    assert [(i.type, i.bus) for i in d.inputs] == [
        ("tablet", "usb"), ("mouse", "ps2"), ("keyboard", "ps2")]
    ports = [c for c in d.controllers if c.model == "pcie-root-port"]
    assert [(c.index, c.chassis, c.port) for c in ports][:2] == [(1, 1, 0x10), (2, 2, 0x11)]
    assert (d.suspend_to_mem, d.suspend_to_disk) == (False, False)
    assert d.videos[0].model == "virtio" and d.videos[0].heads == 1
    assert d.watchdogs[0].model == "i6300esb" and d.rngs[0].source == "/dev/urandom"
    assert d.audios[0].type == "none" and d.memballoon_address == PciAddress(bus=5, slot=0)


def test_the_server_definition_round_trips_through_its_xml() -> None:
    assert parse_domain_xml(format_domain_xml(server())) == server()


def test_live_xml_keeps_the_tap_name_and_channel_socket_and_inactive_xml_drops_them() -> None:
    live = running(server())
    xml = format_domain_xml(live, live=True)
    assert "vnet7" in xml and "/run/h/ferry-channel/" in xml and '<alias name="net0"/>' in xml
    assert parse_domain_xml(xml, live=True) == live
    for inactive in (format_domain_xml(live), format_domain_xml(live, migratable=True)):
        assert "vnet7" not in inactive and "ferry-channel" not in inactive
        assert parse_domain_xml(inactive) == server()


def test_a_users_tap_name_is_kept_in_the_definition() -> None:
    xml = with_devices("<interface type='ethernet'><mac address='52:54:00:00:00:01'/>"
                       "<target dev='tap-web' managed='no'/></interface>")
    nic = parse_domain_xml(xml).interfaces[0]
    assert (nic.target_dev, nic.managed, nic.model) == ("tap-web", False, "virtio")
    assert parse_domain_xml(format_domain_xml(parse_domain_xml(xml))) == parse_domain_xml(xml)


def test_a_nic_without_a_mac_gets_one_in_qemus_range_like_libvirt() -> None:
    mac = parse_domain_xml(with_devices("<interface type='user'/>")).interfaces[0].mac
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac)


def test_the_server_argv_places_every_device_where_its_address_says() -> None:
    argv = " ".join(argv_of(server()))
    for part in (
        "-machine pc-q35-7.2,accel=tcg,vmport=off,hpet=off",
        "-drive if=pflash,format=raw,unit=0,file=/usr/share/OVMF/OVMF_CODE_4M.fd,readonly=on",
        "-drive if=pflash,format=raw,unit=1,file=/var/lib/ferry/nvram/debian12_VARS.fd",
        "-smp 2,sockets=1,dies=1,cores=2,threads=1",
        "-global ICH9-LPC.disable_s3=1 -global ICH9-LPC.disable_s4=1",
        "-device pcie-root-port,port=0x10,chassis=1,id=pci.1,bus=pcie.0,addr=0x2,"
        "multifunction=on",
        "-device pcie-root-port,port=0x11,chassis=2,id=pci.2,bus=pcie.0,addr=0x2.1",
        "-device qemu-xhci,id=usb,p2=15,p3=15,bus=pci.2,addr=0x0",
        "-device virtio-serial-pci,id=virtio-serial0,bus=pci.3,addr=0x0",
        "-device virtio-vga,max_outputs=1,id=video0,bus=pcie.0,addr=0x1",
        "-device virtio-blk-pci,bus=pci.4,addr=0x0,drive=drive-virtio-disk0,id=virtio-disk0",
        "-drive if=none,id=drive-sata0-0-0,media=cdrom,readonly=on",
        "-device ide-cd,bus=ide.0,drive=drive-sata0-0-0,id=sata0-0-0",
        "-netdev tap,fd=9,id=hostnet0",
        "-device virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:3c:5e:7a,bus=pci.1,addr=0x0",
        f"-chardev socket,id=charchannel0,path=/run/h/ferry-channel/{UUID}.1,server=on,wait=off",
        "-device virtserialport,bus=virtio-serial0.0,nr=1,chardev=charchannel0,id=channel0,"
        "name=org.qemu.guest_agent.0",
        "-device usb-tablet,id=input0,bus=usb.0",
        "-audiodev none,id=audio1",
        "-device virtio-balloon-pci,id=balloon0,bus=pci.5,addr=0x0",
        "-object rng-random,id=objrng0,filename=/dev/urandom",
        "-device virtio-rng-pci,rng=objrng0,id=rng0,bus=pci.6,addr=0x0",
        "-device i6300esb,id=watchdog0,bus=pci.7,addr=0x0 -watchdog-action reset",
    ):
        assert part in argv, part
    assert "-device ps2" not in argv and "mouse" not in argv


def test_root_ports_come_before_the_devices_on_them() -> None:
    argv = argv_of(server())
    first_port = argv.index("pcie-root-port,port=0x10,chassis=1,id=pci.1,bus=pcie.0,addr=0x2,"
                            "multifunction=on")
    assert all(first_port < i for i, a in enumerate(argv) if "bus=pci." in a and "root" not in a)


def test_a_tap_nic_without_its_fd_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="no tap fd"):
        build_qemu_argv(running(server()), qmp_fd=3, pidfile="/p", kvm=False)


def test_vhost_net_goes_with_the_tap_when_the_host_has_it() -> None:
    argv = build_qemu_argv(running(server()), qmp_fd=3, pidfile="/p", kvm=False,
                           taps={0: (9, 10)})
    assert "tap,fd=9,id=hostnet0,vhost=on,vhostfd=10" in argv


DIRECT = """<domain type='qemu'><name>lin</name><memory unit='MiB'>128</memory>
<os><type machine='pc'>hvm</type><kernel>/k/vmlinux</kernel><initrd>/k/initrd.gz</initrd>
<cmdline>console=ttyS0 ferry.ip=10.0.0.2/24</cmdline></os>
<devices>
<interface type='user'><mac address='52:54:00:12:34:56'/><model type='e1000'/>
<portForward proto='tcp' address='127.0.0.1'><range start='7007' to='7'/></portForward>
<boot order='2'/></interface>
<disk type='block' device='disk'>
<driver name='qemu' type='raw' cache='none' io='native' discard='unmap' detect_zeroes='unmap'
 error_policy='enospace'/>
<source dev='/dev/loop7'/><target dev='vdb' bus='virtio'/><serial>LVM-1</serial>
<boot order='1'/></disk>
</devices></domain>"""


def test_direct_kernel_boot_a_block_disk_and_a_user_nic_reach_qemu() -> None:
    d = parse_domain_xml(DIRECT)
    assert (d.kernel, d.initrd, d.boot_devices) == ("/k/vmlinux", "/k/initrd.gz", ())
    argv = build_qemu_argv(d, qmp_fd=3, pidfile="/p", kvm=True)
    joined = " ".join(argv)
    assert "-machine pc,accel=tcg" in joined  # type='qemu' stays on TCG where KVM exists
    assert argv[argv.index("-kernel") + 1] == "/k/vmlinux"
    assert argv[argv.index("-append") + 1] == "console=ttyS0 ferry.ip=10.0.0.2/24"
    assert "-boot strict=on" in joined
    assert ("file.driver=host_device,file.filename=/dev/loop7,format=raw,if=none,"
            "id=drive-virtio-disk1,cache=none,aio=native,discard=unmap,detect-zeroes=unmap,"
            "werror=enospc") in argv
    assert ("virtio-blk-pci,drive=drive-virtio-disk1,id=virtio-disk1,serial=LVM-1,"
            "bootindex=1") in argv
    assert "user,id=hostnet0,hostfwd=tcp:127.0.0.1:7007-:7" in argv
    assert "e1000,netdev=hostnet0,id=net0,mac=52:54:00:12:34:56,bootindex=2" in argv
    assert parse_domain_xml(format_domain_xml(d)) == d


def test_a_custom_cpu_is_enforced_with_its_features_and_topology() -> None:
    head = ("<vcpu>4</vcpu><cpu mode='custom' match='exact'><model>Haswell-noTSX</model>"
            "<topology sockets='2' dies='1' cores='2' threads='1'/>"
            "<feature policy='require' name='ssbd'/><feature policy='disable' name='hle'/>"
            "</cpu>")
    d = parse_domain_xml(with_devices("", head=head))
    assert d.cpu_features == (CpuFeature(name="ssbd"), CpuFeature(name="hle", policy="disable"))
    argv = build_qemu_argv(d, qmp_fd=3, pidfile="/p", kvm=False)
    assert argv[argv.index("-cpu") + 1] == "Haswell-noTSX,+ssbd,-hle,enforce"
    assert argv[argv.index("-smp") + 1] == "4,sockets=2,dies=1,cores=2,threads=1"
    assert parse_domain_xml(format_domain_xml(d)) == d


@pytest.mark.parametrize("xml, exc, needle", [
    (with_devices("", head="<cpu mode='custom'><model>X</model>"
                  "<feature policy='optional' name='vmx'/></cpu>"), UnsupportedError,
     "policy 'optional'"),
    (with_devices("", head="<cpu mode='custom' match='minimum'><model>X</model></cpu>"),
     UnsupportedError, "cpu match 'minimum'"),
    (with_devices("", head="<vcpu>2</vcpu><cpu><topology sockets='1' cores='1' threads='1'/>"
                  "</cpu>"), InvalidInputError, "topology gives 1 vcpus, <vcpu> is 2"),
    ("<domain type='kvm'><name>t</name><memory>65536</memory><os firmware='efi'>"
     "<type>hvm</type></os></domain>", UnsupportedError, "firmware autoselection"),
    (with_devices("").replace("<type machine='pc'>hvm</type>", "<type machine='pc'>hvm</type>"
                              "<loader secure='yes'>/f/CODE.fd</loader>"),
     UnsupportedError, "Secure Boot"),
    (with_devices("", machine="virt"), UnsupportedError, "os machine 'virt'"),
    (with_devices("<disk type='file'><source file='/a'/><target dev='hda' bus='ide'/></disk>",
                  machine="q35"), UnsupportedError, "bus 'ide' does not exist on machine 'q35'"),
    (with_devices("<interface type='bridge'><mac address='52:54:00:00:00:01'/></interface>"),
     InvalidInputError, "needs a <source bridge=...>"),
    (with_devices("<interface type='vhostuser'/>"), UnsupportedError, "type 'vhostuser'"),
    (with_devices("<interface type='user'><model type='ne2k_pci'/></interface>"),
     UnsupportedError, "model type 'ne2k_pci'"),
    (with_devices("<interface type='user'><mac address='01:00:00:00:00:01'/></interface>"),
     InvalidInputError, "multicast"),
    (with_devices("<interface type='user'><mac address='52:54:00:00:00:01'/></interface>" * 2),
     InvalidInputError, "duplicate interface mac address 52:54:00:00:00:01"),
    (with_devices("<interface type='bridge'><source bridge='br0'/><portForward>"
                  "<range start='1' to='2'/></portForward></interface>"),
     InvalidInputError, "portForward is for type 'user' only"),
    (with_devices("<interface type='user'><vlan/></interface>"), UnsupportedError,
     "<vlan> in <interface>"),
    (with_devices("<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/>"
                  "</channel>"), InvalidInputError, "spicevmc channel needs spice graphics"),
    (with_devices("<channel type='pty'><target type='virtio' name='x'/></channel>"),
     UnsupportedError, "channel type 'pty'"),
    (with_devices("<controller type='usb' model='none'/><input type='tablet' bus='usb'/>"),
     InvalidInputError, "needs a USB controller"),
    (with_devices("<controller type='scsi' model='lsilogic'/>"), UnsupportedError,
     "controller scsi 0 model 'lsilogic' is not one of virtio-scsi"),
    (with_devices("<controller type='scsi' model='virtio-scsi'><driver queues='4'/>"
                  "</controller>"), UnsupportedError,
     "controller scsi driver queues='4' is not supported"),
    (with_devices("<disk type='file'><source file='/a'/><target dev='sda' bus='scsi'/>"
                  "<address type='drive' controller='0' bus='1' target='0' unit='0'/></disk>"),
     UnsupportedError, "drive address 0:1:0:0: virtio-scsi has bus 0 only"),
    (with_devices("<disk type='file'><source file='/a'/><target dev='sda' bus='scsi'/></disk>"
                  "<disk type='file'><source file='/b'/><target dev='sdb' bus='scsi'/>"
                  "<address type='drive' controller='0' bus='0' target='0' unit='0'/></disk>"),
     InvalidInputError, "duplicate disk drive address 0:0:0:0"),
    (with_devices("<disk type='file'><source file='/a'/><target dev='sda' bus='usb'/></disk>"),
     UnsupportedError, "bus 'usb' is not supported"),
    (with_devices("<controller type='pci' index='1' model='pcie-root-port'/>"),
     UnsupportedError, "does not fit machine 'pc'"),
    (with_devices("<rng model='virtio'><backend model='random'>/etc/passwd</backend></rng>"),
     UnsupportedError, "rng backend '/etc/passwd'"),
    (with_devices("<rng model='virtio'><backend model='egd' type='tcp'/></rng>"),
     UnsupportedError, "backend model 'egd'"),
    (with_devices("<watchdog model='diag288'/>"), UnsupportedError, "watchdog model 'diag288'"),
    (with_devices("<audio id='1' type='pulseaudio'/>"), UnsupportedError, "audio type"),
    (with_devices("<video><model type='qxl' ram='1000'/></video>"), InvalidInputError,
     "video ram 1000 KiB"),
    (with_devices("<interface type='user'><address type='pci' bus='0x03' slot='0x00'/>"
                  "</interface>", machine="q35"), InvalidInputError,
     "no pcie-root-port controller of that index"),
    (with_devices("<interface type='user'><address type='pci' slot='0x05'/></interface>"
                  "<rng model='virtio'><backend model='random'>/dev/urandom</backend>"
                  "<address type='pci' slot='0x05'/></rng>"), InvalidInputError,
     "duplicate pci address 00:05.0"),
    (with_devices("<disk type='file'><source file='/a'/><target dev='vda'/>"
                  "<driver io='fancy'/></disk>"), InvalidInputError, "driver io 'fancy'"),
])
def test_what_stays_unsupported_or_wrong_is_refused_in_one_line_naming_it(
        xml: str, exc: type[Exception], needle: str) -> None:
    with pytest.raises(exc, match=re.escape(needle)) as info:
        parse_domain_xml(xml)
    assert "\n" not in str(info.value)


def test_usb_inputs_and_channels_bring_their_controllers_like_libvirt() -> None:
    d = parse_domain_xml(with_devices(
        "<input type='tablet' bus='usb'/><channel type='unix'><target type='virtio' "
        "name='org.qemu.guest_agent.0'/></channel>"))
    assert [(c.type, c.model) for c in d.controllers] == [
        ("usb", "piix3-uhci"), ("virtio-serial", None)]
    argv = build_qemu_argv(with_channel_paths(d, "/r"), qmp_fd=3, pidfile="/p", kvm=False)
    assert "piix3-usb-uhci,id=usb" in argv and "virtio-serial-pci,id=virtio-serial0" in argv


def abi(src: DomainDef, **changes: object) -> list[str]:
    return abi_diff(src, dataclasses.replace(src, **changes))


def nic(d: DomainDef, **changes: object) -> tuple[Interface, ...]:
    return (dataclasses.replace(d.interfaces[0], **changes),)


def test_the_abi_check_refuses_a_changed_mac_model_or_pci_address_of_a_nic() -> None:
    d = server()
    assert abi(d, interfaces=nic(d, mac="52:54:00:00:00:09")) == [
        "target interface[0] mac 52:54:00:00:00:09 does not match source 52:54:00:3c:5e:7a"]
    assert abi(d, interfaces=nic(d, model="e1000")) == [
        "target interface[0] model e1000 does not match source virtio"]
    assert abi(d, interfaces=nic(d, address=PciAddress(bus=1, slot=1))) == [
        "target interface[0] pci address 01:01.0 does not match source 01:00.0"]


def test_the_abi_check_lets_the_bridge_network_tap_and_host_paths_differ() -> None:
    d = server()
    assert abi(d, interfaces=nic(d, type="bridge", source="br1", target_dev="tap9")) == []
    assert d.firmware is not None
    fw = dataclasses.replace(d.firmware, nvram="/other/x_VARS.fd")
    assert abi(d, firmware=fw) == []
    assert abi(d, channels=(dataclasses.replace(d.channels[0], path="/other/sock"),)) == []


def test_the_abi_check_refuses_guest_visible_cpu_and_device_changes() -> None:
    d = server()
    assert abi(d, cpu_topology=Topology(sockets=2, cores=1, threads=1)) == [
        "target domain cpu topology 2s1d1c1t does not match source 1s1d2c1t"]
    assert abi(d, suspend_to_mem=True) == [
        "target domain pm suspend-to-mem yes does not match source no"]
    ctrls = (*(c for c in d.controllers if c.type != "usb"),
             Controller(type="usb", model="ich9-ehci1"))
    assert abi(d, controllers=ctrls)[0].startswith("target controller[0] type pci")
    assert abi(d, channels=(dataclasses.replace(d.channels[0], port=2),)) == [
        "target channel[0] target port 2 does not match source 1"]
    assert abi(d, watchdogs=())[0] == "target domain watchdog count 0 does not match source 1"


# ---------------------------------------------------------------- can this host run the CPU


def caps() -> CpuCaps:
    return CpuCaps("tcg", {"Nehalem": frozenset(), "Skylake-Client": frozenset({"hle", "rtm"})},
                   frozenset({"sse4-2", "avx2", "vmx"}),
                   {"Nehalem": frozenset({"sse4.2", "popcnt"})})


def cpu(model: str, *features: str) -> DomainDef:
    feats = "".join(f"<feature policy='{p}' name='{n}'/>" for p, n in
                    (f.split(":") for f in features))
    return parse_domain_xml(with_devices("", head=f"<cpu mode='custom'><model>{model}</model>"
                                         f"{feats}</cpu>"))


def test_a_model_this_host_can_run_is_accepted() -> None:
    assert cpu_problems(cpu("Nehalem", "require:avx2", "disable:vmx"), caps()) == []


def test_a_model_lacking_features_here_is_refused_naming_them() -> None:
    assert cpu_problems(cpu("Skylake-Client"), caps()) == [
        "cpu model 'Skylake-Client' needs hle, rtm, which this host lacks"]


def test_a_hidden_feature_makes_the_models_made_of_it_unrunnable() -> None:
    assert cpu_problems(cpu("Nehalem"), caps(), ["sse4_2"]) == [
        "cpu model 'Nehalem' needs sse4_2, which this host lacks (or hides: "
        "FERRY_CPU_HIDE_FEATURES)"]


def test_required_features_must_be_here_and_forbidden_ones_must_not() -> None:
    assert cpu_problems(cpu("Nehalem", "require:avx512f", "forbid:vmx"), caps()) == [
        "cpu features avx512f are required but this host lacks them",
        "cpu features vmx are forbidden but this host has them"]
    assert cpu_problems(cpu("Nehalem", "require:avx2"), caps(), ["avx2"]) == [
        "cpu features avx2 are required but this host lacks them"]


def test_an_unknown_model_is_refused() -> None:
    assert cpu_problems(cpu("Pentium9"), caps()) == ["cpu model 'Pentium9' is unknown to this QEMU"]


def test_controllers_without_an_index_get_the_lowest_free_one_of_their_type_like_libvirt() -> None:
    d = parse_domain_xml(with_devices(
        "<controller type='pci' model='pcie-root'/><controller type='pci' "
        "model='pcie-root-port'/><controller type='pci' index='2' model='pcie-root-port'/>"
        "<controller type='pci' model='pcie-root-port'/><controller type='usb'/>"
        "<controller type='virtio-serial' ports='16' vectors='4'/>", machine="q35"))
    assert [(c.type, c.index, c.model) for c in d.controllers] == [
        ("pci", 0, "pcie-root"), ("pci", 1, "pcie-root-port"), ("pci", 2, "pcie-root-port"),
        ("pci", 3, "pcie-root-port"), ("usb", 0, "qemu-xhci"), ("virtio-serial", 0, None)]
    argv = build_qemu_argv(d, qmp_fd=3, pidfile="/p", kvm=False)
    assert "virtio-serial-pci,id=virtio-serial0,max_ports=16,vectors=4" in argv
    assert "qemu-xhci,id=usb" in argv
    assert parse_domain_xml(format_domain_xml(d)) == d


@pytest.mark.parametrize("xml, needle", [
    (with_devices("<memballoon model='virtio' autodeflate='on'/>"), "autodeflate='on'"),
    (with_devices("<disk type='file'><driver queues='4'/><source file='/a'/>"
                  "<target dev='vda'/></disk>"), "disk driver queues='4'"),
    (with_devices("<video><model type='qxl' vram64='65536'/></video>"), "vram64"),
    (with_devices("", head="<cpu mode='host-passthrough' migratable='off'/>"),
     "cpu migratable='off'"),
])
def test_guest_visible_attributes_ferry_does_not_model_are_refused_not_dropped(
        xml: str, needle: str) -> None:
    with pytest.raises(UnsupportedError, match=re.escape(needle)):
        parse_domain_xml(xml)
    assert parse_domain_xml(SERVER)  # while the values that change nothing pass


def test_a_unix_channel_the_worker_bound_goes_in_as_a_listening_fd() -> None:
    from workers.qemu_argv import Handover

    d = with_channel_paths(parse_domain_xml(with_devices(
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>"
        "</channel>")), "/r")
    argv = build_qemu_argv(d, qmp_fd=3, kvm=False, handover=Handover(channel_sockets={0: 17}))
    assert "socket,id=charchannel0,fd=17,server=on,wait=off" in argv
    assert not any(d.channels[0].path in a for a in argv if a.startswith("socket,"))
    by_path = build_qemu_argv(d, qmp_fd=3, kvm=False)
    assert f"socket,id=charchannel0,path={d.channels[0].path},server=on,wait=off" in by_path


# ---------------------------------------------------------------- virtio-scsi

SCSI = """<controller type='scsi' index='0' model='virtio-scsi'>
<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/></controller>
<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>
<source file='/var/lib/libvirt/images/s.qcow2'/><target dev='sda' bus='scsi'/>
<address type='drive' controller='0' bus='0' target='0' unit='2'/></disk>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sdb' bus='scsi'/>
<readonly/></disk>"""


def disks_xml(d: DomainDef) -> list[str]:
    text = format_domain_xml(d)
    return ["".join(line.strip() for line in part.split("</disk>")[0].splitlines())
            for part in text.split("<disk ")[1:]]


def test_scsi_disks_and_a_scsi_cdrom_sit_on_virtio_scsi_at_their_drive_addresses() -> None:
    d = parse_domain_xml(with_devices(SCSI))
    assert disks_xml(d) == [
        'type="file" device="disk"><driver name="qemu" type="qcow2" cache="none"/>'
        '<source file="/var/lib/libvirt/images/s.qcow2"/><target dev="sda" bus="scsi"/>'
        '<address type="drive" controller="0" bus="0" target="0" unit="2"/>',
        'type="file" device="cdrom"><driver name="qemu" type="raw"/>'
        '<target dev="sdb" bus="scsi"/><readonly/>'
        '<address type="drive" controller="0" bus="0" target="0" unit="1"/>']
    assert parse_domain_xml(format_domain_xml(d)) == d
    argv = build_qemu_argv(d, qmp_fd=3, pidfile="/run/h/p", kvm=False)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[0] == "virtio-scsi-pci,id=scsi0,bus=pci.0,addr=0x5"
    assert "scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=2,device_id=drive-scsi0-0-0-2," \
           "drive=drive-scsi0-0-0-2,id=scsi0-0-0-2" in devices
    assert "scsi-cd,bus=scsi0.0,channel=0,scsi-id=0,lun=1,drive=drive-scsi0-0-0-1," \
           "id=scsi0-0-0-1" in devices
    assert "file=/var/lib/libvirt/images/s.qcow2,format=qcow2,if=none," \
           "id=drive-scsi0-0-0-2,cache=none" in argv


def test_a_scsi_disk_without_a_controller_brings_a_virtio_scsi_one_as_libvirt_does() -> None:
    d = parse_domain_xml(with_devices(
        "<disk type='file'><source file='/a'/><target dev='sdj' bus='scsi'/></disk>"
        "<controller type='scsi' index='0'/>", machine="q35"))
    assert [(c.type, c.index, c.model) for c in d.controllers if c.type == "scsi"] == [
        ("scsi", 0, "virtio-scsi"), ("scsi", 1, "virtio-scsi")]  # sdj: controller 1, unit 2
    assert str(d.disks[0].drive) == "1:0:0:2" and d.disks[0].alias == "scsi1-0-0-2"
    assert "<controller type=\"scsi\" index=\"1\" model=\"virtio-scsi\"/>" in format_domain_xml(d)


def test_the_abi_check_refuses_a_scsi_disk_moved_to_another_unit_or_controller() -> None:
    d = parse_domain_xml(with_devices(SCSI))
    moved = parse_domain_xml(with_devices(SCSI.replace("unit='2'", "unit='3'")))
    assert abi_diff(d, moved) == ["target disk sda drive address 0:0:0:3 does not match "
                                  "source 0:0:0:2"]
    on_virtio = parse_domain_xml(with_devices(SCSI.replace(
        "<target dev='sda' bus='scsi'/>\n<address type='drive' controller='0' bus='0' "
        "target='0' unit='2'/>", "<target dev='vda' bus='virtio'/>")))
    assert abi_diff(d, on_virtio)[0] == "target disk sda bus virtio does not match source scsi"


# ---------------------------------------------------------------- guest NUMA

NUMA = ("<vcpu>3</vcpu><cpu><numa><cell id='0' cpus='0,2' memory='32' unit='MiB'>"
        "<distances><sibling id='0' value='10'/><sibling id='1' value='21'/></distances></cell>"
        "<cell id='1' cpus='1' memory='32768'/></numa></cpu>")


def test_numa_cells_become_one_ram_backend_and_node_each_and_the_memory_is_their_sum(
        ) -> None:
    d = parse_domain_xml(with_devices("", head="<memory>1048576</memory>" + NUMA
                                      ).replace("<memory>65536</memory>", "", 1))
    text = format_domain_xml(d)
    numa = "".join(line.strip() for line in
                   text[text.index("<numa>"):text.index("</numa>") + 7].splitlines())
    assert numa == (
        '<numa><cell id="0" cpus="0,2" memory="32768" unit="KiB"><distances>'
        '<sibling id="0" value="10"/><sibling id="1" value="21"/></distances></cell>'
        '<cell id="1" cpus="1" memory="32768" unit="KiB"/></numa>')
    assert (d.memory_kib, d.current_memory_kib) == (65536, 65536)  # libvirt: the cells' sum
    assert parse_domain_xml(text) == d
    argv = build_qemu_argv(d, qmp_fd=3, pidfile="/run/h/p", kvm=False)
    start = argv.index("-object")
    assert argv[argv.index("-m") + 1] == "size=65536k"
    assert argv[start:start + 12] == [
        "-object", "memory-backend-ram,id=ram-node0,size=33554432",
        "-numa", "node,nodeid=0,cpus=0,cpus=2,memdev=ram-node0",
        "-object", "memory-backend-ram,id=ram-node1,size=33554432",
        "-numa", "node,nodeid=1,cpus=1,memdev=ram-node1",
        "-numa", "dist,src=0,dst=0,val=10", "-numa", "dist,src=0,dst=1,val=21"]


def test_the_abi_check_refuses_other_numa_cells() -> None:
    d = parse_domain_xml(with_devices("", head=NUMA))
    other = parse_domain_xml(with_devices("", head=NUMA.replace("cpus='0,2'", "cpus='0'")
                                          .replace("cpus='1'", "cpus='1-2'")))
    assert abi_diff(d, other) == [
        "target domain cpu numa 0:cpus=0:32768KiB:dist=0=10/1=21,1:cpus=1-2:32768KiB does "
        "not match source 0:cpus=0+2:32768KiB:dist=0=10/1=21,1:cpus=1:32768KiB"]


@pytest.mark.parametrize("cpu, exc, needle", [
    ("<vcpu>2</vcpu><cpu><numa><cell id='1' cpus='0-1' memory='64' unit='MiB'/></numa></cpu>",
     InvalidInputError, "cpu numa cell ids [1] are not 0..N-1 in order"),
    ("<vcpu>2</vcpu><cpu><numa><cell cpus='0-1' memory='32' unit='MiB'/>"
     "<cell cpus='1' memory='32' unit='MiB'/></numa></cpu>", InvalidInputError,
     "cpu numa: vcpus 1 are in more than one cell"),
    ("<vcpu>2</vcpu><cpu><numa><cell cpus='0' memory='64' unit='MiB'/></numa></cpu>",
     InvalidInputError, "cpu numa: vcpus 1 are in no cell"),
    ("<vcpu>1</vcpu><cpu><numa><cell cpus='0-3' memory='64' unit='MiB'/></numa></cpu>",
     InvalidInputError, "cpu numa: vcpus 1-3 are beyond <vcpu> 1"),
    ("<cpu><numa><cell cpus='0' memory='1000'/></numa></cpu>", InvalidInputError,
     "cpu numa cell 0 memory 1000 KiB is not a positive whole number of MiB"),
    ("<cpu><numa><cell cpus='0' memory='64' unit='MiB' memAccess='shared'/></numa></cpu>",
     UnsupportedError, "cpu numa cell memAccess='shared' is not supported"),
    ("<cpu><numa><cell cpus='0' memory='64' unit='MiB' discard='yes'/></numa></cpu>",
     UnsupportedError, "cpu numa cell discard='yes' is not supported"),
    ("<cpu><numa><cell cpus='0' memory='64' unit='MiB'><cache level='3'/></cell></numa>"
     "</cpu>", UnsupportedError, "unsupported element <cache> in <cell>"),
    ("<cpu><numa><interconnects/></numa></cpu>", UnsupportedError,
     "unsupported element <interconnects> in <numa>"),
    ("<cpu><numa><cell cpus='x' memory='64' unit='MiB'/></numa></cpu>", InvalidInputError,
     "cpu numa cell cpus 'x' is not a cpu list"),
    ("<vcpu>2</vcpu><cpu><numa><cell cpus='0' memory='32' unit='MiB'><distances>"
     "<sibling id='0' value='10'/></distances></cell><cell cpus='1' memory='32' unit='MiB'/>"
     "<cell memory='32' unit='MiB'/></numa></cpu>", InvalidInputError,
     "cpu numa distances between cells 0-1, 0-2, 1-2 are missing"),
    ("<cpu><numa><cell cpus='0' memory='64' unit='MiB'><distances><sibling id='0' "
     "value='20'/></distances></cell></numa></cpu>", InvalidInputError,
     "cpu numa cell 0 distance 20 to 0 is not 10 (its own)"),
    ("<cpu><numa><cell cpus='0' memory='64' unit='MiB'/></numa></cpu><numatune/>",
     UnsupportedError, "unsupported element <numatune> in <domain>"),
])
def test_numa_that_is_not_supported_or_wrong_is_refused_naming_it(
        cpu: str, exc: type[Exception], needle: str) -> None:
    with pytest.raises(exc, match=re.escape(needle)) as info:
        parse_domain_xml(with_devices("", head=cpu))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- macvtap

MACVTAP = ("<interface type='direct'><mac address='52:54:00:17:00:09'/>"
          "<source dev='eth0' mode='bridge'/><target dev='macvtap3'/><model type='virtio'/>"
          "</interface>")


def test_a_direct_nic_is_a_macvtap_in_bridge_mode_on_its_parent_device() -> None:
    d = parse_domain_xml(with_devices(MACVTAP), live=True)
    (nic,) = d.interfaces
    assert (nic.type, nic.source, nic.source_mode, nic.target_dev) == (
        "direct", "eth0", "bridge", "macvtap3")
    text = format_domain_xml(d)  # macvtapN is the host's name: not in the definition
    assert '<source dev="eth0" mode="bridge"/>' in text and "macvtap3" not in text
    assert '<target dev="macvtap3"/>' in format_domain_xml(d, live=True)
    argv = build_qemu_argv(d, qmp_fd=3, pidfile="/run/h/p", kvm=False, taps={0: (9, None)})
    assert argv[argv.index("-netdev") + 1] == "tap,fd=9,id=hostnet0"
    other = parse_domain_xml(with_devices(MACVTAP.replace("eth0", "eth1")))
    assert abi_diff(d.inactive(), other) == []  # the parent device is the host's


@pytest.mark.parametrize("xml, needle", [
    (MACVTAP.replace(" mode='bridge'", ""), "direct source mode 'vepa' is not supported (bridge)"),
    (MACVTAP.replace("'bridge'", "'passthrough'"),
     "direct source mode 'passthrough' is not supported (bridge)"),
    (MACVTAP.replace("<source dev='eth0' mode='bridge'/>", ""),
     "interface type 'direct' needs a <source dev=...>"),
    (MACVTAP.replace("<model type='virtio'/>", "<virtualport type='802.1Qbh'/>"),
     "unsupported element <virtualport> in <interface>"),
])
def test_macvtap_modes_other_than_bridge_are_refused_by_name(xml: str, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(needle)):
        parse_domain_xml(with_devices(xml))


# ---------------------------------------------------------------- once accepted and dropped


def test_vmport_off_reaches_the_machine_and_the_abi_check() -> None:
    d = parse_domain_xml(with_devices("", head="<features><acpi/><vmport state='off'/>"
                                      "</features>"))
    assert "<features>\n    <acpi/>\n    <vmport state=\"off\"/>\n  </features>" in \
        format_domain_xml(d)
    argv = build_qemu_argv(d, qmp_fd=3, pidfile="/run/h/p", kvm=False)
    assert argv[argv.index("-machine") + 1] == "pc,accel=tcg,vmport=off"
    assert abi_diff(d, dataclasses.replace(d, vmport=None)) == [
        "target domain feature vmport none does not match source no"]


def test_the_boot_menu_reaches_the_firmware() -> None:
    xml = with_devices("").replace("hvm</type>", "hvm</type><boot dev='hd'/>"
                                   "<bootmenu enable='yes' timeout='3000'/>")
    d = parse_domain_xml(xml)
    assert '<bootmenu enable="yes" timeout="3000"/>' in format_domain_xml(d)
    assert parse_domain_xml(format_domain_xml(d)) == d
    argv = build_qemu_argv(d, qmp_fd=3, pidfile="/run/h/p", kvm=False)
    assert argv[argv.index("-boot") + 1] == "order=c,menu=on,splash-time=3000"
    off = parse_domain_xml(xml.replace("'yes'", "'no'"))
    assert build_qemu_argv(off, qmp_fd=3, pidfile="/p", kvm=False)[
        argv.index("-boot") + 1] == "order=c"


def test_numa_cells_over_the_memory_limit_or_with_huge_cpu_lists_are_refused_quickly() -> None:
    cells = "".join("<cell cpus='0-254' memory='8' unit='GiB'/>" for _ in range(100))
    with pytest.raises(InvalidInputError, match="over the limit of"):
        parse_domain_xml(with_devices("", head=f"<cpu><numa>{cells}</numa></cpu>"),
                         max_memory_kib=512 * 1024 ** 2)
    with pytest.raises(InvalidInputError,
                       match=r"^cpu numa: vcpus 0-254 are in more than one cell$"):
        parse_domain_xml(with_devices("", head=f"<cpu><numa>{cells}</numa></cpu>"))
    for cpus in ("0-255", ",".join(["0"] * 257)):
        with pytest.raises(InvalidInputError, match="range 0-255 goes down or past vcpu 254"
                           if cpus == "0-255" else "has more than 256 parts"):
            parse_domain_xml(with_devices("", head=f"<cpu><numa><cell cpus='{cpus}' "
                                          "memory='64' unit='MiB'/></numa></cpu>"))
