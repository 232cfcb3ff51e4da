"""What libvirt's domain format documents and ferry does not run: refused by name, never dropped.

Each case is a snippet of the kind libvirt's domain XML reference and example
definitions show (devices, tuning, features, CPU and firmware options), put in an
otherwise accepted definition: parsing it must refuse the guest in one line that
names what is not supported (the element, its type or model, or the attribute),
so nothing a user wrote is silently left out of the guest.
"""

from __future__ import annotations

import re

import pytest

from workers.domain_xml import parse_domain_xml
from workers.errors import InvalidInputError

UUID = "8a1c2f3e-9d4b-4c5a-8e7f-1a2b3c4d5e6f"
OS = "<os><type machine='pc'>hvm</type></os>"

DEV = [
    ("hostdev pci",
     "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus"
     "='0x06' slot='0x02' function='0x0'/></source></hostdev>",
     "<hostdev> in <devices>"),
    ("hostdev usb",
     "<hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/><product id='0xbeef'/"
     "></source></hostdev>",
     "<hostdev> in <devices>"),
    ("sound",
     "<sound model='ich6'/>",
     "<sound> in <devices>"),
    ("filesystem",
     "<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/><source dir="
     "'/s'/><target dir='t'/></filesystem>",
     "<filesystem> in <devices>"),
    ("tpm",
     "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>",
     "<tpm> in <devices>"),
    ("redirdev",
     "<redirdev bus='usb' type='spicevmc'/>",
     "<redirdev> in <devices>"),
    ("smartcard",
     "<smartcard mode='host'/>",
     "<smartcard> in <devices>"),
    ("hub",
     "<hub type='usb'/>",
     "<hub> in <devices>"),
    ("panic",
     "<panic model='isa'/>",
     "<panic> in <devices>"),
    ("memory dimm",
     "<memory model='dimm'><target><size unit='KiB'>524287</size><node>0</node></target></mem"
     "ory>",
     "<memory> in <devices>"),
    ("iommu",
     "<iommu model='intel'/>",
     "<iommu> in <devices>"),
    ("vsock",
     "<vsock model='virtio'><cid auto='yes'/></vsock>",
     "<vsock> in <devices>"),
    ("shmem",
     "<shmem name='my_shmem0'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>",
     "<shmem> in <devices>"),
    ("lease",
     "<lease><lockspace>somearea</lockspace><key>somekey</key><target path='/some/lease/path'"
     " offset='1024'/></lease>",
     "<lease> in <devices>"),
    ("parallel",
     "<parallel type='pty'><target port='0'/></parallel>",
     "<parallel> in <devices>"),
    ("crypto",
     "<crypto model='virtio' type='qemu'><backend model='builtin' queues='1'/></crypto>",
     "<crypto> in <devices>"),
    ("interface hostdev",
     "<interface type='hostdev' managed='yes'><source><address type='pci' domain='0x0000' bus"
     "='0x00' slot='0x07' function='0x0'/></source></interface>",
     "interface type 'hostdev'"),
    ("interface vhostuser",
     "<interface type='vhostuser'><source type='unix' path='/tmp/vhost1.sock' mode='server'/>"
     "<model type='virtio'/></interface>",
     "interface type 'vhostuser'"),
    ("interface mcast",
     "<interface type='mcast'><source address='230.0.0.1' port='5558'/></interface>",
     "interface type 'mcast'"),
    ("interface vdpa",
     "<interface type='vdpa'><source dev='/dev/vhost-vdpa-0'/></interface>",
     "interface type 'vdpa'"),
    ("interface driver",
     "<interface type='network'><source network='default'/><model type='virtio'/><driver name"
     "='vhost' queues='5'/></interface>",
     "<driver> in <interface>"),
    ("interface bandwidth",
     "<interface type='network'><source network='default'/><bandwidth><inbound average='1000'"
     "/></bandwidth></interface>",
     "<bandwidth> in <interface>"),
    ("interface vlan",
     "<interface type='bridge'><source bridge='br0'/><vlan><tag id='42'/></vlan></interface>",
     "<vlan> in <interface>"),
    ("interface virtualport",
     "<interface type='bridge'><source bridge='ovsbr'/><virtualport type='openvswitch'/></int"
     "erface>",
     "<virtualport> in <interface>"),
    ("interface filterref",
     "<interface type='bridge'><source bridge='br0'/><filterref filter='clean-traffic'/></int"
     "erface>",
     "<filterref> in <interface>"),
    ("interface link",
     "<interface type='bridge'><source bridge='br0'/><link state='down'/></interface>",
     "<link> in <interface>"),
    ("interface mtu",
     "<interface type='bridge'><source bridge='br0'/><mtu size='9000'/></interface>",
     "<mtu> in <interface>"),
    ("interface rom",
     "<interface type='bridge'><source bridge='br0'/><rom bar='off'/></interface>",
     "<rom> in <interface>"),
    ("interface coalesce",
     "<interface type='bridge'><source bridge='br0'/><coalesce><rx><frames max='7'/></rx></co"
     "alesce></interface>",
     "<coalesce> in <interface>"),
    ("interface script",
     "<interface type='ethernet'><script path='/etc/qemu-ifup'/></interface>",
     "<script> in <interface>"),
    ("interface ip",
     "<interface type='ethernet'><ip address='192.168.122.5' prefix='24'/></interface>",
     "<ip> in <interface>"),
    ("interface tune",
     "<interface type='bridge'><source bridge='br0'/><tune><sndbuf>1600</sndbuf></tune></inte"
     "rface>",
     "<tune> in <interface>"),
    ("interface backend passt",
     "<interface type='user'><backend type='passt'/></interface>",
     "<backend> in <interface>"),
    ("interface teaming",
     "<interface type='bridge'><source bridge='br0'/><teaming type='persistent'/></interface>",
     "<teaming> in <interface>"),
    ("disk network",
     "<disk type='network' device='disk'><source protocol='rbd' name='p/i'><host name='m' por"
     "t='6789'/></source><target dev='vdb' bus='virtio'/></disk>",
     "disk type 'network'"),
    ("disk volume",
     "<disk type='volume' device='disk'><source pool='blk-pool0' volume='blk-pool0-vol0'/><ta"
     "rget dev='vdb' bus='virtio'/></disk>",
     "disk type 'volume'"),
    ("disk nvme",
     "<disk type='nvme' device='disk'><source type='pci' managed='yes' namespace='1'/><target"
     " dev='vdb' bus='virtio'/></disk>",
     "disk type 'nvme'"),
    ("disk lun",
     "<disk type='block' device='lun'><source dev='/dev/sda'/><target dev='sda' bus='scsi'/><"
     "/disk>",
     "device 'lun'"),
    ("disk floppy",
     "<disk type='file' device='floppy'><source file='/f.img'/><target dev='fda' bus='fdc'/><"
     "/disk>",
     "device 'floppy'"),
    ("disk usb",
     "<disk type='file'><source file='/u.img'/><target dev='sdb' bus='usb'/></disk>",
     "bus 'usb'"),
    ("disk iotune",
     "<disk type='file'><source file='/a.img'/><target dev='vdb'/><iotune><total_bytes_sec>10"
     "000000</total_bytes_sec></iotune></disk>",
     "<iotune> in <disk>"),
    ("disk geometry",
     "<disk type='file'><source file='/a.img'/><target dev='vdb'/><geometry cyls='16383' head"
     "s='16' secs='63'/></disk>",
     "<geometry> in <disk>"),
    ("disk blockio",
     "<disk type='file'><source file='/a.img'/><target dev='vdb'/><blockio logical_block_size"
     "='512'/></disk>",
     "<blockio> in <disk>"),
    ("disk encryption",
     "<disk type='file'><source file='/a.img'><encryption format='luks'/></source><target dev"
     "='vdb'/></disk>",
     "<encryption> in <source>"),
    ("disk wwn",
     "<disk type='file'><source file='/a.img'/><target dev='sdb' bus='scsi'/><wwn>0x5000c5001"
     "5ea71ac</wwn></disk>",
     "<wwn> in <disk>"),
    ("disk vendor",
     "<disk type='file'><source file='/a.img'/><target dev='sdb' bus='scsi'/><vendor>V</vendo"
     "r></disk>",
     "<vendor> in <disk>"),
    ("disk transient",
     "<disk type='file'><source file='/a.img'/><target dev='vdb'/><transient/></disk>",
     "<transient> in <disk>"),
    ("disk rotation_rate",
     "<disk type='file'><source file='/a.img'/><target dev='sdb' bus='scsi' rotation_rate='1'"
     "/></disk>",
     "disk target rotation_rate='1'"),
    ("disk rerror_policy",
     "<disk type='file'><driver name='qemu' type='raw' rerror_policy='stop'/><source file='/a"
     ".img'/><target dev='vdb'/></disk>",
     "disk driver rerror_policy='stop'"),
    ("disk drive address",
     "<disk type='file'><source file='/a.img'/><target dev='hda' bus='ide'/><address type='dr"
     "ive' controller='0' bus='1' target='0' unit='0'/></disk>",
     "disk hda drive address 0:1:0:0 is not where its target dev puts it (0:0:0:0)"),
    ("controller lsilogic",
     "<controller type='scsi' index='0' model='lsilogic'/>",
     "model 'lsilogic'"),
    ("controller ccid",
     "<controller type='ccid' index='0'/>",
     "controller type 'ccid'"),
    ("controller xenbus",
     "<controller type='xenbus'/>",
     "controller type 'xenbus'"),
    ("controller uhci companion",
     "<controller type='usb' index='0' model='ich9-uhci1'><master startport='0'/></controller"
     ">",
     "model 'ich9-uhci1'"),
    ("input passthrough",
     "<input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input>",
     "input type 'passthrough'"),
    ("input evdev",
     "<input type='evdev'><source dev='/dev/input/event1'/></input>",
     "input type 'evdev'"),
    ("graphics sdl",
     "<graphics type='sdl' display=':0.0'/>",
     "graphics type 'sdl'"),
    ("graphics rdp",
     "<graphics type='rdp' autoport='yes'/>",
     "graphics type 'rdp'"),
    ("graphics egl-headless",
     "<graphics type='egl-headless'/>",
     "graphics type 'egl-headless'"),
    ("graphics dbus",
     "<graphics type='dbus'/>",
     "graphics type 'dbus'"),
    ("video accel",
     "<video><model type='virtio' heads='1'><acceleration accel3d='yes'/></model></video>",
     "<acceleration> in <model>"),
    ("video driver",
     "<video><model type='virtio'/><driver name='vhostuser'/></video>",
     "<driver> in <video>"),
    ("channel pty",
     "<channel type='pty'><target type='virtio' name='arbitrary.virtio.serial.port.name'/></c"
     "hannel>",
     "channel type 'pty'"),
    ("channel guestfwd",
     "<channel type='pty'><target type='guestfwd' address='10.0.2.1' port='4600'/></channel>",
     "channel target type 'guestfwd'"),
    ("console virtio",
     "<console type='pty'><target type='virtio' port='0'/></console>",
     "console target 'virtio'"),
    ("serial usb",
     "<serial type='pty'><target type='usb-serial' port='0'/></serial>",
     "serial target type 'usb-serial'"),
    ("rng egd",
     "<rng model='virtio'><backend model='egd' type='tcp'><source mode='connect' host='1.2.3."
     "4' service='1234'/></backend></rng>",
     "backend model 'egd'"),
    ("rng builtin",
     "<rng model='virtio'><backend model='builtin'/></rng>",
     "backend model 'builtin'"),
    ("watchdog diag288",
     "<watchdog model='diag288' action='poweroff'/>",
     "watchdog model 'diag288'"),
    ("audio spice",
     "<audio id='1' type='spice'/>",
     "audio type 'spice'"),
    ("memballoon autodeflate",
     "<memballoon model='virtio' autodeflate='on'/>",
     "memballoon autodeflate='on'"),
    ("memballoon driver",
     "<memballoon model='virtio'><driver iommu='on'/></memballoon>",
     "<driver> in <memballoon>"),
]
HEAD = [
    ("sysinfo",
     "<sysinfo type='smbios'><bios><entry name='vendor'>LENOVO</entry></bios></sysinfo>",
     "<sysinfo> in <domain>"),
    ("memoryBacking",
     "<memoryBacking><hugepages/></memoryBacking>",
     "<memoryBacking> in <domain>"),
    ("memtune",
     "<memtune><hard_limit unit='G'>1</hard_limit></memtune>",
     "<memtune> in <domain>"),
    ("blkiotune",
     "<blkiotune><weight>800</weight></blkiotune>",
     "<blkiotune> in <domain>"),
    ("cputune",
     "<cputune><vcpupin vcpu='0' cpuset='1'/></cputune>",
     "<cputune> in <domain>"),
    ("numatune",
     "<numatune><memory mode='strict' nodeset='1-4,^3'/></numatune>",
     "<numatune> in <domain>"),
    ("iothreads",
     "<iothreads>4</iothreads>",
     "<iothreads> in <domain>"),
    ("vcpus",
     "<vcpus><vcpu id='0' enabled='yes' hotpluggable='no'/></vcpus>",
     "<vcpus> in <domain>"),
    ("maxMemory",
     "<maxMemory slots='16' unit='KiB'>1524288</maxMemory>",
     "<maxMemory> in <domain>"),
    ("idmap",
     "<idmap><uid start='0' target='1000' count='10'/></idmap>",
     "<idmap> in <domain>"),
    ("keywrap",
     "<keywrap><cipher name='aes' state='off'/></keywrap>",
     "<keywrap> in <domain>"),
    ("perf",
     "<perf><event name='cmt' enabled='yes'/></perf>",
     "<perf> in <domain>"),
    ("launchSecurity",
     "<launchSecurity type='sev'><policy>0x0003</policy></launchSecurity>",
     "<launchSecurity> in <domain>"),
    ("genid",
     "<genid/>",
     "<genid> in <domain>"),
    ("bootloader",
     "<bootloader>/usr/bin/pygrub</bootloader>",
     "<bootloader> in <domain>"),
    ("on_lockfailure",
     "<on_lockfailure>poweroff</on_lockfailure>",
     "<on_lockfailure> in <domain>"),
    ("hyperv",
     "<features><acpi/><hyperv mode='custom'><relaxed state='on'/></hyperv></features>",
     "<hyperv> in <features>"),
    ("kvm hidden",
     "<features><kvm><hidden state='on'/></kvm></features>",
     "<kvm> in <features>"),
    ("smm",
     "<features><smm state='on'/></features>",
     "<smm> in <features>"),
    ("ioapic",
     "<features><ioapic driver='qemu'/></features>",
     "<ioapic> in <features>"),
    ("pvspinlock",
     "<features><pvspinlock state='on'/></features>",
     "<pvspinlock> in <features>"),
    ("pmu",
     "<features><pmu state='off'/></features>",
     "<pmu> in <features>"),
    ("vmcoreinfo",
     "<features><vmcoreinfo state='on'/></features>",
     "<vmcoreinfo> in <features>"),
    ("cpu cache",
     "<cpu mode='host-passthrough'><cache mode='passthrough'/></cpu>",
     "<cache> in <cpu>"),
    ("cpu vendor",
     "<cpu mode='custom'><model>Nehalem</model><vendor>Intel</vendor></cpu>",
     "<vendor> in <cpu>"),
    ("cpu model vendor_id",
     "<cpu mode='custom'><model vendor_id='GenuineIntel'>Nehalem</model></cpu>",
     "cpu model vendor_id='GenuineIntel'"),
    ("cpu feature optional",
     "<cpu mode='custom'><model>Nehalem</model><feature policy='optional' name='vmx'/></cpu>",
     "policy 'optional'"),
    ("cpu maxphysaddr",
     "<cpu mode='host-passthrough'><maxphysaddr mode='passthrough'/></cpu>",
     "<maxphysaddr> in <cpu>"),
    ("cpu numa memAccess",
     "<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB' memAccess='shared'/></numa></cp"
     "u>",
     "memAccess='shared'"),
    ("timer tsc frequency",
     "<clock offset='utc'><timer name='tsc' frequency='3504000000' mode='native'/></clock>",
     "clock timer tsc frequency='3504000000'"),
    ("os smbios host",
     "<os><type machine='pc'>hvm</type><smbios mode='host'/></os>",
     "os smbios mode 'host'"),
    ("os firmware efi",
     "<os firmware='efi'><type machine='q35'>hvm</type></os>",
     "firmware autoselection"),
    ("os secure boot",
     "<os><type machine='q35'>hvm</type><loader readonly='yes' secure='yes' type='pflash'>/us"
     "r/share/OVMF/OVMF_CODE.secboot.fd</loader></os>",
     "Secure Boot"),
    ("os acpi table",
     "<os><type machine='pc'>hvm</type><acpi><table type='slic'>/path/to/slic.dat</table></ac"
     "pi></os>",
     "<acpi> in <os>"),
    ("os initarg",
     "<os><type machine='pc'>hvm</type><initarg>--unit</initarg></os>",
     "<initarg> in <os>"),
    ("os type arch i686",
     "<os><type arch='i686' machine='pc'>hvm</type></os>",
     "os arch 'i686'"),
    ("machine microvm",
     "<os><type machine='microvm'>hvm</type></os>",
     "os machine 'microvm'"),
]

def domain(head: str = "", devices: str = "") -> str:
    os_ = OS
    if head.startswith("<os"):
        os_, head = head, ""
    return (f"<domain type='qemu'><name>t</name><uuid>{UUID}</uuid><memory>65536</memory>"
            f"{head}{os_}<devices>{devices}</devices></domain>")


@pytest.mark.parametrize("snippet, needle", [(s, n) for _, s, n in DEV],
                         ids=[name for name, _, _ in DEV])
def test_a_device_ferry_does_not_run_is_refused_in_one_line_naming_it(
        snippet: str, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(needle)) as info:
        parse_domain_xml(domain(devices=snippet))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("snippet, needle", [(s, n) for _, s, n in HEAD],
                         ids=[name for name, _, _ in HEAD])
def test_tuning_features_and_cpu_options_ferry_does_not_run_are_refused_naming_them(
        snippet: str, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(needle)) as info:
        parse_domain_xml(domain(head=snippet))
    assert "\n" not in str(info.value)


def test_hostdev_is_refused_in_one_line() -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_domain_xml(domain(devices=DEV[0][1]))
    assert str(info.value) == "unsupported element <hostdev> in <devices>"
