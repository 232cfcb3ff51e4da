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
        "-machine pc-q35-7.2,accel=tcg,hpet=off",
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
    (with_devices("<controller type='scsi' model='virtio-scsi'/>"), UnsupportedError,
     "controller type 'scsi'"),
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
