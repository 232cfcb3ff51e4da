"""What a host checks and makes for a guest before QEMU starts: bridges, tap names, MACs, NVRAM."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers import netdev
from workers.domain import DomainDef
from workers.domain_xml import parse_domain_xml
from workers.errors import InvalidInputError, UnsupportedError
from workers.guestfiles import ensure_nvram, with_nvram_path
from workers.hostcaps import check_same_cpu, cpu_signature


def guest(devices: str = "", os_extra: str = "", name: str = "g") -> DomainDef:
    return parse_domain_xml(f"<domain type='qemu'><name>{name}</name><memory>65536</memory>"
                            f"<os><type>hvm</type>{os_extra}</os><devices>{devices}</devices>"
                            "</domain>")


def nic(kind: str, source: str = "", mac: str = "52:54:00:00:00:01", target: str = "") -> str:
    src = f"<source {source}/>" if source else ""
    return f"<interface type='{kind}'><mac address='{mac}'/>{src}{target}</interface>"


@pytest.fixture
def sys_net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /sys/class/net with a bridge br0 and a device eth7."""
    (tmp_path / "br0" / "bridge").mkdir(parents=True)
    (tmp_path / "eth7").mkdir()
    monkeypatch.setattr(netdev, "SYS_NET", tmp_path)
    return tmp_path


def test_a_bridge_nic_on_an_existing_bridge_passes(sys_net: Path) -> None:
    netdev.check_networks(guest(nic("bridge", "bridge='br0'")), {}, "h1")


def test_a_missing_bridge_is_refused_naming_it_and_the_host(sys_net: Path) -> None:
    with pytest.raises(netdev.NetworkError, match="host h1: bridge 'br9' of interface "
                       "52:54:00:00:00:01 does not exist"):
        netdev.check_networks(guest(nic("bridge", "bridge='br9'")), {}, "h1")


def test_a_network_maps_to_the_hosts_bridge_or_is_refused_naming_the_known_ones(
        sys_net: Path) -> None:
    d = guest(nic("network", "network='lan'"))
    netdev.check_networks(d, {"lan": "br0"}, "h1")
    assert netdev.bridge_of(d.interfaces[0], {"lan": "br0"}, "h1") == "br0"
    with pytest.raises(netdev.NetworkError, match=r"network 'lan' .* is not defined "
                       r"\(FERRY_NETWORKS: default\)"):
        netdev.check_networks(d, {"default": "br0"}, "h1")


def test_a_tap_name_taken_is_refused_and_an_unmanaged_tap_must_exist(sys_net: Path) -> None:
    with pytest.raises(netdev.NetworkError, match=r"tap name 'eth7' .* is taken"):
        netdev.check_networks(guest(nic("bridge", "bridge='br0'", target="<target dev='eth7'/>")),
                              {}, "h1")
    premade = "<target dev='tap5' managed='no'/>"
    with pytest.raises(netdev.NetworkError, match=r"tap 'tap5' .* does not exist"):
        netdev.check_networks(guest(nic("ethernet", target=premade)), {}, "h1")
    (sys_net / "tap5").mkdir()
    netdev.check_networks(guest(nic("ethernet", target=premade)), {}, "h1")


def test_user_networking_needs_nothing_from_the_host(sys_net: Path) -> None:
    netdev.check_networks(guest(nic("user")), {}, "h1")
    assert netdev.open_taps(guest(nic("user")), {}, "h1") == []


def test_one_mac_on_two_guests_of_a_host_is_refused() -> None:
    mine, other = guest(nic("user"), name="a"), guest(nic("user"), name="b")
    with pytest.raises(netdev.NetworkError, match="mac address 52:54:00:00:00:01 of 'a' is "
                       "already used by guest 'b'"):
        netdev.check_macs(mine, [other], "h1")
    netdev.check_macs(mine, [guest(nic("user", mac="52:54:00:00:00:02"), name="c")], "h1")


def test_the_tap_gets_libvirts_host_side_mac() -> None:
    assert netdev.host_mac("52:54:00:ab:cd:ef") == "fe:54:00:ab:cd:ef"


LOADER = "<loader readonly='yes' type='pflash'>/fw/OVMF_CODE_4M.fd</loader>"


def test_an_nvram_without_a_file_goes_to_the_nvram_dir_named_like_libvirt() -> None:
    d = with_nvram_path(guest(os_extra=LOADER), Path("/var/lib/ferry/nvram"))
    assert d.firmware is not None
    assert d.firmware.nvram == "/var/lib/ferry/nvram/g_VARS.fd"
    assert d.firmware.default_template() == "/fw/OVMF_VARS_4M.fd"


def test_a_first_start_copies_the_template_and_a_later_one_keeps_the_file(
        tmp_path: Path) -> None:
    template = tmp_path / "VARS.fd"
    template.write_bytes(b"template")
    nvram = tmp_path / "nv" / "g_VARS.fd"
    d = guest(os_extra=f"{LOADER}<nvram template='{template}'>{nvram}</nvram>")
    ensure_nvram(d, incoming=False, host="h1")
    assert nvram.read_bytes() == b"template"
    nvram.write_bytes(b"written by the firmware")
    ensure_nvram(d, incoming=False, host="h1")
    assert nvram.read_bytes() == b"written by the firmware"
    assert [p.name for p in nvram.parent.iterdir()] == ["g_VARS.fd"]


def test_a_missing_template_or_an_incoming_guests_missing_nvram_is_refused(
        tmp_path: Path) -> None:
    nvram = tmp_path / "g_VARS.fd"
    d = guest(os_extra=f"{LOADER}<nvram template='{tmp_path}/none.fd'>{nvram}</nvram>")
    with pytest.raises(InvalidInputError, match=r"NVRAM template .*none\.fd of 'g' does not"):
        ensure_nvram(d, incoming=False, host="h1")
    with pytest.raises(InvalidInputError, match="does not exist here: it must be on storage"):
        ensure_nvram(d, incoming=True, host="h1")
    assert list(tmp_path.iterdir()) == []


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
stepping\t: 1
flags\t\t: fpu sse4_2 avx2 svm

processor\t: 1
vendor_id\t: AuthenticAMD
"""


def test_a_hosts_cpu_signature_changes_with_the_features_it_hides() -> None:
    sig = cpu_signature(cpuinfo=CPUINFO)
    assert sig.startswith("AuthenticAMD 25/1/1 flags ")
    assert cpu_signature(["sse4.2"], cpuinfo=CPUINFO) != sig
    assert cpu_signature(["avx512f"], cpuinfo=CPUINFO) == sig


def test_host_passthrough_moves_only_to_the_same_cpu_unless_unsafe() -> None:
    d = parse_domain_xml("<domain type='kvm'><name>g</name><memory>65536</memory>"
                         "<cpu mode='host-passthrough'/></domain>")
    check_same_cpu(d, "A", "A", unsafe=False)
    check_same_cpu(d, "A", "B", unsafe=True)
    with pytest.raises(UnsupportedError, match=r"differs from the source's \(A\)"):
        check_same_cpu(d, "A", "B", unsafe=False)
    tcg = parse_domain_xml("<domain type='qemu'><name>g</name><memory>65536</memory>"
                           "<cpu mode='host-passthrough'/></domain>")
    check_same_cpu(tcg, "A", "B", unsafe=False)  # TCG's max CPU does not follow the host
