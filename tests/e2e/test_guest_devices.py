"""Server-guest devices on real workers and QEMU: defined, started, migrated, still working.

The test guest here is the tiny counting guest (TCG), dressed as a server: a NIC on
user networking, the guest agent channel, a tablet, an rng, a watchdog, audio none,
explicit controllers; a block device (a loop device the test makes); a UEFI guest
(OVMF) with its NVRAM, on shared storage and with a storage copy; and the bad input
around them: a CPU the dest cannot run, an NVRAM the dest cannot see, a missing NVRAM
template, a missing block device.
The NIC-on-a-bridge cases need namespaces: tests/e2e/test_guest_network.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.testbed.stack import Stack, wait_for
from tasks.client import Client
from tests.conftest import Guest, qemu_pids_of, wait_info
from workers.errors import FerryError

pytestmark = pytest.mark.e2e

SERVER_DEVICES = """
    <controller type='usb' index='0' model='piix3-uhci'/>
    <controller type='virtio-serial' index='0'/>
    <interface type='user'>
      <mac address='{mac}'/>
      <model type='virtio'/>
    </interface>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <input type='tablet' bus='usb'/>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <audio id='1' type='none'/>
    <video><model type='vga' vram='16384' heads='1'/></video>
    <watchdog model='i6300esb' action='reset'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"""


def qmp(client: Client, host: str, domain: str, command: str, /, **args: object) -> object:
    return client.call(host, "qemu_monitor_command", domain=domain,
                       command=json.dumps({"execute": command, "arguments": args}))


def start(client: Client, guest: Guest, host: str = "alpha") -> None:
    client.call(host, "define", xml=guest.xml)
    client.call(host, "start", domain=guest.name)


def test_a_server_guest_moves_with_its_nic_channel_and_devices_managed_and_p2p(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    mac = "52:54:00:17:00:01"
    guest = make_guest(domain_type="qemu", extra_devices=SERVER_DEVICES.format(mac=mac))
    start(client, guest)
    guest.wait_counter_above(0)
    buses = qmp(client, "alpha", guest.name, "query-pci")
    assert isinstance(buses, list)
    ids = {d["qdev_id"] for b in buses for d in b["devices"]}
    assert {"net0", "watchdog0", "rng0", "virtio-serial0", "usb", "video0"} <= ids
    for opts, (src, dst) in (({}, ("alpha", "beta")), ({"p2p": True}, ("beta", "alpha"))):
        summary = client.migrate(guest.name, src, dst, live=True, **opts).wait(timeout=90)
        assert summary["result"] == "completed"
        info = client.call(dst, "dominfo", domain=guest.name)
        assert (info["state"], info["reason"]) == ("running", "migrated")
        guest.wait_counter_above(guest.counters()[-1] + 2)
        xml = client.call(dst, "dumpxml", domain=guest.name)
        assert f"<mac address=\"{mac}\"/>" in xml and "org.qemu.guest_agent.0" in xml
        sock = next(line.split('path="')[1].split('"')[0] for line in xml.splitlines()
                    if "ferry-channel" in line)
        assert Path(sock).is_socket() and f"/{dst}/" in sock  # the dest's own socket
        nics = qmp(client, dst, guest.name, "query-rx-filter", name="net0")
        assert isinstance(nics, list) and nics[0]["main-mac"] == mac
        assert qemu_pids_of(guest.uuid) == [info["pid"]]


OLD_Q35_PORT = """
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'>
      <model name='ioh3420'/>
      <target chassis='1' port='0x10'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </controller>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </rng>"""


def _pci(client: Client, host: str, name: str) -> dict[tuple[int, int], tuple[int, int]]:
    """(bus, slot) -> (vendor, device id) of every PCI device the guest's QEMU has."""
    found: dict[tuple[int, int], tuple[int, int]] = {}

    def walk(devices: list[dict[str, Any]]) -> None:
        for d in devices:
            found[(d["bus"], d["slot"])] = (d["id"]["vendor"], d["id"]["device"])
            walk((d.get("pci_bridge") or {}).get("devices", []))

    buses = qmp(client, host, name, "query-pci")
    assert isinstance(buses, list)
    for b in buses:
        walk(b["devices"])
    return found


def test_an_older_q35_guests_ioh3420_root_port_moves_with_its_device_behind_it(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    """q35 guests defined before QEMU's generic root port (2017) carry Intel's ioh3420."""
    guest = make_guest(domain_type="qemu", extra_devices=OLD_Q35_PORT)
    guest.xml = guest.xml.replace("machine='pc'", "machine='q35'").replace(
        "bus='ide'", "bus='sata'").replace("dev='hda'", "dev='sda'")
    start(client, guest)
    guest.wait_counter_above(0)
    before = _pci(client, "alpha", guest.name)
    assert before[(0, 2)] == (0x8086, 0x3420), "the root port is an ioh3420"
    assert before[(1, 0)][0] == 0x1AF4, "the rng sits behind it"
    summary = client.migrate(guest.name, "alpha", "beta", live=True).wait(timeout=90)
    assert summary["result"] == "completed"
    assert _pci(client, "beta", guest.name) == before
    guest.wait_counter_above(guest.counters()[-1] + 2)
    assert "<model name=\"ioh3420\"/>" in client.call("beta", "dumpxml", domain=guest.name)


@pytest.fixture
def loop_device(tmp_path: Path, base_image: Path) -> Iterator[str]:
    """A loop device over a copy of the test image; detached at the end."""
    if shutil.which("losetup") is None:
        pytest.skip("no losetup")
    backing = tmp_path / "block.img"
    shutil.copyfile(base_image, backing)
    made = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                          text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot make a loop device here: {made.stderr.strip()}")
    dev = made.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


def test_a_guest_on_a_block_device_moves_and_keeps_writing_it(
        client: Client, make_guest: Callable[..., Guest], loop_device: str) -> None:
    guest = make_guest(domain_type="qemu")
    xml = guest.xml.replace("<disk type='file' device='disk'>", "<disk type='block' "
                            "device='disk'>").replace(f"<source file='{guest.disk}'/>",
                                                      f"<source dev='{loop_device}'/>")
    xml = xml.replace("<driver name='qemu' type='raw'/>", "<driver name='qemu' type='raw' "
                      "cache='none' io='native' error_policy='stop'/><serial>BLOCK-1</serial>")
    guest.xml = xml
    before = os.stat(loop_device)
    start(client, guest)
    guest.wait_counter_above(0)
    qemu_user = client.settings.qemu_user
    if qemu_user not in ("", "root"):  # the node is the confined QEMU's while it runs
        assert os.stat(loop_device).st_uid == pwd.getpwnam(qemu_user).pw_uid
    blocks = qmp(client, "alpha", guest.name, "query-block")
    assert isinstance(blocks, list)
    assert [(b["inserted"]["file"], b["inserted"]["image"]["format"]) for b in blocks] == [
        (loop_device, "raw")]
    for opts, (src, dst) in (({}, ("alpha", "beta")), ({"p2p": True}, ("beta", "alpha"))):
        summary = client.migrate(guest.name, src, dst, live=True, **opts).wait(timeout=90)
        assert summary["result"] == "completed"
        guest.wait_counter_above(guest.counters()[-1] + 2)
        info = client.call(dst, "domblkinfo", domain=guest.name, device="hda")
        assert info["path"] == loop_device
        assert "<source dev=" in client.call(dst, "dumpxml", domain=guest.name)
    client.call("alpha", "destroy", domain=guest.name)  # the last user: the owner comes back
    after = os.stat(loop_device)
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)


def test_a_server_guest_is_saved_and_restored_with_its_nic_and_channel(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    mac = "52:54:00:17:00:02"
    guest = make_guest(domain_type="qemu", extra_devices=SERVER_DEVICES.format(mac=mac))
    start(client, guest)
    guest.wait_counter_above(0)
    image = tmp_path / "server.img.zst"
    client.call("alpha", "save", domain=guest.name, path=str(image), compression="zstd")
    assert qemu_pids_of(guest.uuid) == []
    restored = client.call("alpha", "restore", path=str(image))
    assert (restored["state"], restored["reason"]) == ("running", "restored")
    guest.wait_counter_above(guest.counters()[-1] + 2)
    nics = qmp(client, "alpha", guest.name, "query-rx-filter", name="net0")
    assert isinstance(nics, list) and nics[0]["main-mac"] == mac
    assert "org.qemu.guest_agent.0" in client.call("alpha", "dumpxml", domain=guest.name)


def test_a_missing_block_device_fails_the_start_in_one_line_and_leaves_no_qemu(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(domain_type="qemu")
    guest.xml = guest.xml.replace("<disk type='file' device='disk'>", "<disk type='block' "
                                  "device='disk'>").replace(f"<source file='{guest.disk}'/>",
                                                            "<source dev='/dev/ferry-none'/>")
    client.call("alpha", "define", xml=guest.xml)
    with pytest.raises(FerryError, match="/dev/ferry-none") as err:
        client.call("alpha", "start", domain=guest.name)
    assert "\n" not in str(err.value)
    assert client.call("alpha", "dominfo", domain=guest.name)["state"] == "shutoff"
    assert qemu_pids_of(guest.uuid) == []


OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def uefi_xml(guest: Guest, nvram: Path | None, template: Path = OVMF_VARS) -> str:
    """The guest on q35 with OVMF; no bootable disk, so the firmware ends in its shell."""
    nv = f"<nvram template='{template}'>{nvram}</nvram>" if nvram else \
        f"<nvram template='{template}'/>"
    xml = guest.xml.replace("machine='pc'", "machine='q35'").replace(
        "<boot dev='hd'/>", f"<loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>{nv}"
        "<boot dev='hd'/>")
    return xml.replace("bus='ide'", "bus='sata'").replace("dev='hda'", "dev='sda'")


class SerialConsole:
    """A client of a guest's serial port on a unix socket (QEMU listens): what it printed
    since we connected, and a way to type."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(0.2)
        self.seen = b""

    def text(self) -> str:
        with contextlib.suppress(TimeoutError, BlockingIOError):
            while chunk := self.sock.recv(65536):
                self.seen += chunk
        return self.seen.decode(errors="replace")

    def type(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r")

    def close(self) -> None:
        self.sock.close()


GAVE_UP = "No bootable option or device was found"


def wait_for_shell(client: Client, host: str, guest: Guest, console: SerialConsole) -> None:
    """OVMF's shell on the serial console: ~10 s under TCG here, more under load; a key
    typed before it would open the setup menu instead.  Now and then (seen under load,
    1 boot in 5 or fewer) the firmware starts its internal shell and has it back at once,
    then waits for a key: that boot is reset, once."""
    for attempt in (1, 2):
        try:
            wait_for(lambda: "Shell>" in console.text() or GAVE_UP in console.text(), 180,
                     "OVMF's shell on the serial port")
        except TimeoutError as exc:  # say what the firmware printed and where the guest is
            state = client.call(host, "dominfo", domain=guest.name)["state"]
            raise TimeoutError(f"{exc}; domain {state}; the console's last words: "
                               f"{console.text()[-400:]!r}") from None
        if "Shell>" in console.text():
            return
        if attempt == 1:
            console.seen = b""
            qmp(client, host, guest.name, "system_reset")
    raise AssertionError(f"OVMF gave up twice: {console.text()[-400:]!r}")


def shell_says(console: SerialConsole, word: str, timeout: float) -> None:
    """Type `echo word` until the shell has printed it back (it may still be booting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        console.type(f"echo {word}")
        try:
            wait_for(lambda: console.text().count(word) >= 2, 5, f"the shell to echo {word}")
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"the UEFI shell did not echo {word} in {timeout:.0f}s: "
                       f"{console.text()[-300:]!r}")


@pytest.mark.skipif(not OVMF_CODE.exists(), reason="no OVMF (Debian package ovmf)")
def test_a_uefi_guest_boots_from_its_own_nvram_and_moves_with_it(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    guest = make_guest(domain_type="qemu", memory_mib=128)
    nvram = tmp_path / "nv" / f"{guest.name}_VARS.fd"
    a_sock, b_sock = tmp_path / "a.sock", tmp_path / "b.sock"
    serial = f"<serial type='file'>\n      <source path='{guest.serial}' append='on'/>"
    assert serial in guest.xml
    guest.xml = uefi_xml(guest, nvram).replace(
        serial, f"<serial type='unix'>\n      <source mode='bind' path='{a_sock}'/>")
    start(client, guest)
    assert nvram.read_bytes()[:64] == OVMF_VARS.read_bytes()[:64]  # made from the template
    console = SerialConsole(a_sock)
    try:
        wait_for_shell(client, "alpha", guest, console)
        shell_says(console, "ferry-before", 60)
    finally:
        console.close()
    assert nvram.read_bytes() != OVMF_VARS.read_bytes()  # the firmware wrote its variables
    xmlin = client.call("alpha", "dumpxml", domain=guest.name, migratable=True)
    summary = client.migrate(guest.name, "alpha", "beta", live=True,
                             xmlin=xmlin.replace(str(a_sock), str(b_sock))).wait(timeout=120)
    assert summary["result"] == "completed"
    blocks = qmp(client, "beta", guest.name, "query-block")
    assert isinstance(blocks, list)
    assert {b["device"]: b["inserted"]["file"] for b in blocks if "pflash" in b["device"]} == {
        "pflash0": str(OVMF_CODE), "pflash1": str(nvram)}
    console = SerialConsole(b_sock)  # the firmware runs on the dest: its shell answers there
    try:
        shell_says(console, "ferry-moved", 60)
    finally:
        console.close()
    # Back with a storage copy to files of alpha's own: the disk is copied, the NVRAM
    # is made from the template and QEMU fills it with the variables the flash held.
    own_nvram, own_disk, c_sock = tmp_path / "own" / "VARS.fd", tmp_path / "own.img", \
        tmp_path / "c.sock"
    xmlin = client.call("beta", "dumpxml", domain=guest.name, migratable=True)
    xmlin = xmlin.replace(str(b_sock), str(c_sock)).replace(str(nvram), str(own_nvram)) \
        .replace(f'file="{guest.disk}"', f'file="{own_disk}"')
    assert str(own_disk) in xmlin
    summary = client.migrate(guest.name, "beta", "alpha", live=True, copy_storage_all=True,
                             xmlin=xmlin).wait(timeout=120)
    assert summary["result"] == "completed"
    assert own_nvram.read_bytes() == nvram.read_bytes() != OVMF_VARS.read_bytes()
    blocks = qmp(client, "alpha", guest.name, "query-block")
    assert {b["device"]: b["inserted"]["file"] for b in blocks if "pflash" in b["device"]} == {
        "pflash0": str(OVMF_CODE), "pflash1": str(own_nvram)}
    console = SerialConsole(c_sock)
    try:
        shell_says(console, "ferry-copied", 60)
    finally:
        console.close()


@pytest.mark.skipif(not OVMF_CODE.exists(), reason="no OVMF (Debian package ovmf)")
def test_a_failed_storage_copy_removes_the_nvram_prepare_made_and_the_source_runs_on(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    """Prepare makes the NVRAM (the dest has none) before QEMU and the NBD server start;
    the NBD port taken fails it after that, and the file goes with the images."""
    guest = make_guest(domain_type="qemu")
    guest.xml = uefi_xml(guest, tmp_path / "src.fd")
    start(client, guest)
    dest_nvram, dest_disk = tmp_path / "dst" / "VARS.fd", tmp_path / "dst.img"
    xmlin = guest.xml.replace(str(tmp_path / "src.fd"), str(dest_nvram)) \
        .replace(f"file='{guest.disk}'", f"file='{dest_disk}'")
    report = client.migrate_dry_run(guest.name, "alpha", "beta", live=True,
                                    copy_storage_all=True, xmlin=xmlin)
    assert report["nvram"] == {"path": str(dest_nvram), "file": "create"}
    assert not dest_nvram.exists(), "a dry run makes nothing"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FerryError, match=f"the NBD port {port} on 127.0.0.1 is in use"):
            client.migrate(guest.name, "alpha", "beta", live=True, copy_storage_all=True,
                           disks_port=port, xmlin=xmlin).wait(timeout=60)
    assert not dest_nvram.exists() and not dest_disk.exists()
    assert list(dest_nvram.parent.glob(".VARS.fd*")) == []
    info = client.call("alpha", "dominfo", domain=guest.name)
    assert info["state"] == "running" and qemu_pids_of(guest.uuid) == [info["pid"]]


@pytest.mark.skipif(not OVMF_CODE.exists(), reason="no OVMF (Debian package ovmf)")
def test_a_missing_nvram_template_refuses_the_start_and_writes_nothing(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    guest = make_guest(domain_type="qemu")
    nvram = tmp_path / "nv.fd"
    guest.xml = uefi_xml(guest, nvram, template=tmp_path / "no-such-VARS.fd")
    client.call("alpha", "define", xml=guest.xml)
    with pytest.raises(FerryError, match=r"NVRAM template .*no-such-VARS\.fd .* does not exist"):
        client.call("alpha", "start", domain=guest.name)
    assert not nvram.exists() and list(tmp_path.glob(".nv.fd*")) == []
    assert qemu_pids_of(guest.uuid) == []


@pytest.mark.skipif(not OVMF_CODE.exists(), reason="no OVMF (Debian package ovmf)")
def test_an_nvram_the_dest_cannot_see_is_refused_in_prepare_and_the_source_runs_on(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    """Both hosts here see one file system; the dest's view of an NVRAM that is not on
    shared storage is made by removing the file once the source QEMU has it open."""
    guest = make_guest(domain_type="qemu")
    guest.xml = uefi_xml(guest, None)  # default: in alpha's own state dir
    start(client, guest)
    xml = client.call("alpha", "dumpxml", domain=guest.name, inactive=True)
    nvram = Path(xml.split("<nvram")[1].split(">")[1].split("<")[0])
    assert nvram.name == f"{guest.name}_VARS.fd" and nvram.parent.name == "nvram"
    assert "/alpha/" in str(nvram)  # filled in at define: FERRY_NVRAM_DIR's default
    nvram.unlink()
    job = client.migrate(guest.name, "alpha", "beta", live=True)
    with pytest.raises(FerryError, match=r"NVRAM .* does not exist here: it must be on storage "
                                         r"the source host shares, or come with a storage"):
        job.wait(timeout=60)
    info = client.call("alpha", "dominfo", domain=guest.name)
    assert info["state"] == "running"
    assert qemu_pids_of(guest.uuid) == [info["pid"]]


@pytest.fixture
def baseline_host(stack: Stack) -> Iterator[str]:
    """Host 'gamma', whose CPU hides sse4.2 (FERRY_CPU_HIDE_FEATURES): an older CPU."""
    stack.start_worker("gamma", env={"FERRY_CPU_HIDE_FEATURES": "sse4.2"})
    try:
        yield "gamma"
    finally:
        stack.remove_worker("gamma")


def test_a_cpu_model_the_dest_cannot_run_is_refused_in_prepare_naming_the_feature(
        client: Client, make_guest: Callable[..., Guest], baseline_host: str) -> None:
    guest = make_guest(domain_type="qemu")
    guest.xml = guest.xml.replace("<clock", "<cpu mode='custom' match='exact'>"
                                  "<model>Nehalem</model></cpu><clock")
    start(client, guest)
    guest.wait_counter_above(0)
    pid = client.call("alpha", "dominfo", domain=guest.name)["pid"]
    for p2p in (False, True):
        job = client.migrate(guest.name, "alpha", baseline_host, live=True, p2p=p2p)
        with pytest.raises(FerryError, match=r"cpu model 'Nehalem' needs sse4\.2, which this "
                           "host lacks") as err:
            job.wait(timeout=60)
        assert "prepare" in str(err.value) and "\n" not in str(err.value)
        info = client.call("alpha", "dominfo", domain=guest.name)
        assert (info["state"], info["pid"]) == ("running", pid)
        with contextlib.suppress(FerryError):
            assert client.call(baseline_host, "dominfo", domain=guest.name) is None
        assert qemu_pids_of(guest.uuid) == [pid]
    guest.wait_counter_above(guest.counters()[-1] + 2)
    wait_info(client, "alpha", guest.name, lambda i: i["state"] == "running")


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no KVM")
def test_host_passthrough_to_a_host_with_another_cpu_needs_unsafe(
        client: Client, make_guest: Callable[..., Guest], baseline_host: str) -> None:
    guest = make_guest(domain_type="kvm")
    guest.xml = guest.xml.replace("<clock", "<cpu mode='host-passthrough'/><clock")
    start(client, guest)
    guest.wait_counter_above(0, timeout=60)
    pid = client.call("alpha", "dominfo", domain=guest.name)["pid"]
    job = client.migrate(guest.name, "alpha", baseline_host, live=True)
    with pytest.raises(FerryError, match=r"cpu mode 'host-passthrough': this host's CPU .* "
                       r"differs from the source's .* \(--unsafe to migrate anyway\)"):
        job.wait(timeout=60)
    assert client.call("alpha", "dominfo", domain=guest.name)["pid"] == pid
    summary = client.migrate(guest.name, "alpha", baseline_host, live=True,
                             unsafe=True).wait(timeout=90)
    assert summary["result"] == "completed" and "unsafe" in summary["flags"]
    assert client.call(baseline_host, "dominfo", domain=guest.name)["state"] == "running"
    client.call(baseline_host, "destroy", domain=guest.name)


def test_a_host_model_guest_runs_a_named_model_and_moves_to_any_host_that_can_run_it(
        client: Client, make_guest: Callable[..., Guest], baseline_host: str) -> None:
    """host-model expanded at start (TCG: QEMU's max as the closest named model plus
    features); the dest that hides one of them refuses in Prepare, naming it; a dest
    that has them takes the guest without --unsafe."""
    guest = make_guest(domain_type="qemu")
    guest.xml = guest.xml.replace("<clock", "<cpu mode='host-model'/><clock")
    start(client, guest)
    guest.wait_counter_above(0)
    live = client.call("alpha", "dumpxml", domain=guest.name)
    assert "<cpu mode=\"custom\">" in live and "<model>" in live
    assert "<feature policy=\"require\" name=\"sse4.2\"/>" in live
    model = live.split("<model>")[1].split("<")[0]
    assert "<cpu mode=\"host-model\"/>" in client.call("alpha", "dumpxml", domain=guest.name,
                                                        inactive=True)
    pid = client.call("alpha", "dominfo", domain=guest.name)["pid"]
    job = client.migrate(guest.name, "alpha", baseline_host, live=True)
    with pytest.raises(FerryError, match=r"cpu features sse4\.2 are required but this host "
                       "lacks them") as err:
        job.wait(timeout=60)
    assert "prepare" in str(err.value) and "\n" not in str(err.value)
    assert client.call("alpha", "dominfo", domain=guest.name)["pid"] == pid
    assert qemu_pids_of(guest.uuid) == [pid]
    summary = client.migrate(guest.name, "alpha", "beta", live=True).wait(timeout=90)
    assert summary["result"] == "completed" and "unsafe" not in summary["flags"]
    info = client.call("beta", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("running", "migrated")
    assert f"<model>{model}</model>" in client.call("beta", "dumpxml", domain=guest.name)
    cmdline = Path(f"/proc/{info['pid']}/cmdline").read_bytes().split(b"\0")
    assert cmdline[cmdline.index(b"-cpu") + 1].startswith(f"{model},".encode())
    guest.wait_counter_above(guest.counters()[-1] + 2)


def test_a_guest_on_virtio_scsi_moves_managed_p2p_and_with_its_disk_copied(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    """The boot disk on virtio-scsi (SeaBIOS boots from it) and an empty scsi cdrom."""
    cdrom = ("\n    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
             "<target dev='sdb' bus='scsi'/><readonly/></disk>")
    guest = make_guest(domain_type="qemu", disk_bus="scsi", extra_devices=cdrom)
    start(client, guest)
    guest.wait_counter_above(0)
    moves = [({}, ("alpha", "beta")), ({"p2p": True}, ("beta", "alpha"))]
    for opts, (src, dst) in moves:
        summary = client.migrate(guest.name, src, dst, live=True, **opts).wait(timeout=90)
        assert summary["result"] == "completed"
        guest.wait_counter_above(guest.counters()[-1] + 2)
        blocks = qmp(client, dst, guest.name, "query-block")
        assert isinstance(blocks, list)
        assert [(b["device"], b["qdev"]) for b in blocks] == [
            ("drive-scsi0-0-0-0", "scsi0-0-0-0"), ("drive-scsi0-0-0-1", "scsi0-0-0-1")]
        xml = client.call(dst, "dumpxml", domain=guest.name)
        assert '<controller type="scsi" index="0" model="virtio-scsi"/>' in xml
        assert '<address type="drive" controller="0" bus="0" target="0" unit="1"/>' in xml
    copy = tmp_path / "copied" / guest.disk.name
    copy.parent.mkdir()
    summary = client.migrate(guest.name, "alpha", "beta", live=True, copy_storage_all=True,
                             xmlin=guest.xml.replace(f"file='{guest.disk}'",
                                                     f"file='{copy}'")).wait(timeout=120)
    assert summary["result"] == "completed" and summary["statistics"]["disk_remaining"] == 0
    guest.wait_counter_above(guest.counters()[-1] + 2)
    blocks = qmp(client, "beta", guest.name, "query-block")
    assert isinstance(blocks, list) and blocks[0]["inserted"]["file"] == str(copy)


def test_a_guest_with_two_numa_nodes_moves_with_its_nodes_and_their_memory(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(domain_type="qemu", vcpus=2)
    guest.xml = guest.xml.replace("<clock", (
        "<cpu><numa><cell id='0' cpus='0' memory='32' unit='MiB'/>"
        "<cell id='1' cpus='1' memory='32' unit='MiB'><distances><sibling id='0' value='20'/>"
        "</distances></cell></numa></cpu><clock"))
    start(client, guest)
    guest.wait_counter_above(0)
    for opts, (src, dst) in (({}, ("alpha", "beta")), ({"p2p": True}, ("beta", "alpha"))):
        summary = client.migrate(guest.name, src, dst, live=True, **opts).wait(timeout=90)
        assert summary["result"] == "completed"
        guest.wait_counter_above(guest.counters()[-1] + 2)
        memdevs = qmp(client, dst, guest.name, "query-memdev")
        assert isinstance(memdevs, list)
        assert sorted((m["id"], m["size"]) for m in memdevs) == [
            ("ram-node0", 32 << 20), ("ram-node1", 32 << 20)]
        numa = qmp(client, dst, guest.name, "human-monitor-command", **{"command-line":
                                                                          "info numa"})
        assert isinstance(numa, str) and numa.startswith("2 nodes")
        assert "node 0 cpus: 0" in numa and "node 1 cpus: 1" in numa
        xml = client.call(dst, "dumpxml", domain=guest.name)
        assert '<sibling id="0" value="20"/>' in xml


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no KVM")
def test_under_kvm_host_model_is_the_host_cpu_expanded_and_the_guest_moves(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    """QEMU's `host` model under KVM, expanded; the move needs no --unsafe."""
    guest = make_guest(domain_type="kvm")
    guest.xml = guest.xml.replace("<clock", "<cpu mode='host-model'/><clock")
    start(client, guest)
    guest.wait_counter_above(0, timeout=60)
    live = client.call("alpha", "dumpxml", domain=guest.name)
    assert "<cpu mode=\"custom\">" in live and "<feature policy=\"require\"" in live
    model = live.split("<model>")[1].split("<")[0]
    summary = client.migrate(guest.name, "alpha", "beta", live=True).wait(timeout=120)
    assert summary["result"] == "completed" and "unsafe" not in summary["flags"]
    pid = client.call("beta", "dominfo", domain=guest.name)["pid"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[cmdline.index(b"-cpu") + 1].startswith(f"{model},".encode())
    guest.wait_counter_above(guest.counters()[-1] + 1, timeout=60)
