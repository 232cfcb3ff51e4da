"""QEMU 7.2 itself accepts the argv ferry builds, with the monitor on a socket fd it passes in."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.testbed.stack import searchable
from tests.conftest import assert_confined
from workers import confine
from workers.domain import with_graphics_ports
from workers.domain_xml import parse_domain_xml
from workers.qemu_argv import build_qemu_argv, qemu_has_spice

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no qemu-system-x86_64"),
]
HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
QEMU = confine.resolve("ferry-qemu", "")
assert QEMU is not None
DEADLINE_S = 20.0


class Qmp:
    """Just enough QMP over a connected unix socket, every read bounded by one deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self.buf = sock, deadline, b""

    def read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            self.sock.settimeout(max(0.01, self.deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QEMU closed the monitor")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str) -> Any:
        self.sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        while True:
            msg = self.read()
            if "event" in msg:
                continue
            assert "return" in msg, msg
            return msg["return"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must fit in 107 bytes; pytest's tmp_path may not."""
    path = searchable(Path(tempfile.mkdtemp(prefix="ferry-argv-", dir="/tmp")))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_guest(xml: str, workdir: Path, *, kvm: bool, ports: list[int]) -> dict[str, Any]:
    """Start QEMU from `xml`, talk QMP over the passed fd, quit it; return what QMP said."""
    d = with_graphics_ports(parse_domain_xml(xml), ports)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(workdir / "qmp.sock"))
    listener.listen(1)
    argv = build_qemu_argv(
        d,
        qmp_fd=listener.fileno(),
        pidfile=str(workdir / "qemu.pid"),
        kvm=kvm,
        spice=qemu_has_spice(d.emulator),
        sandbox=True,
    )
    conf = QEMU  # confined as ferry runs it: its user owns the throwaway workdir
    for path in (workdir, *workdir.iterdir()):
        os.chown(path, conf.uid, conf.gid)
    with open(workdir / "qemu.log", "wb") as log:
        proc = subprocess.Popen(
            argv,
            pass_fds=[listener.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            user=conf.uid,
            group=conf.gid,
            extra_groups=list(conf.groups),
        )
    listener.close()  # QEMU holds its own copy of the listening socket now
    deadline = time.monotonic() + DEADLINE_S
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(DEADLINE_S)
            conn.connect(str(workdir / "qmp.sock"))
            qmp = Qmp(conn, deadline)
            try:
                greeting = qmp.read()
            except ConnectionError:
                pytest.fail(f"QEMU refused the argv: {(workdir / 'qemu.log').read_text()}")
            qmp.execute("qmp_capabilities")
            seen = {
                "greeting": greeting,
                "status": qmp.execute("query-status"),
                "kvm": qmp.execute("query-kvm"),
                "block": qmp.execute("query-block"),
                "chardev": qmp.execute("query-chardev"),
                "vnc": qmp.execute("query-vnc"),
                "spice": qmp.execute("query-spice"),
                "pidfile": (workdir / "qemu.pid").read_text().strip(),
                "pid": proc.pid,
                "confined": assert_confined(proc.pid) is None,
            }
            qmp.execute("quit")
        seen["exit"] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        return seen
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def typical_xml(workdir: Path, vnc_port: int) -> str:
    disk = workdir / "disk,1.raw"  # a comma: proves the escaping works for real
    with open(disk, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    return f"""<domain type='kvm'>
  <name>argv-check</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <cpu mode='host-passthrough'/>
  <clock offset='utc'><timer name='hpet' present='no'/></clock>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{workdir}/serial,0.log'/><target port='0'/></serial>
    <console type='file'><target type='serial' port='0'/></console>
    <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>
    <video><model type='vga'/></video>
    <memballoon model='virtio'/>
  </devices>
</domain>"""


@pytest.mark.parametrize(
    "kvm",
    [
        False,
        pytest.param(True, marks=pytest.mark.skipif(not HAVE_KVM, reason="no usable /dev/kvm")),
    ],
    ids=["tcg", "kvm"],
)
def test_qemu_accepts_the_argv_of_a_typical_guest(short_dir: Path, kvm: bool) -> None:
    port = free_port()
    seen = run_guest(typical_xml(short_dir, port), short_dir, kvm=kvm, ports=[port])
    assert seen["greeting"]["QMP"]["version"]["qemu"]["major"] >= 7
    assert seen["status"]["status"] == "prelaunch" and seen["status"]["running"] is False
    assert seen["kvm"]["enabled"] is kvm
    assert seen["pidfile"] == str(seen["pid"])
    disk = {b["device"]: b for b in seen["block"]}["drive-virtio-disk0"]
    assert disk["inserted"]["file"] == str(short_dir / "disk,1.raw")
    assert disk["inserted"]["image"]["format"] == "raw"
    assert {c["label"] for c in seen["chardev"]} >= {"charmonitor", "charserial0"}
    assert (short_dir / "serial,0.log").exists()
    assert seen["vnc"]["enabled"] and seen["vnc"]["service"] == str(port)
    assert seen["exit"] == 0 and seen["confined"]


def test_qemu_accepts_spice_ide_disks_an_empty_cdrom_and_a_pty(short_dir: Path) -> None:
    if not qemu_has_spice("/usr/bin/qemu-system-x86_64"):
        pytest.skip("this QEMU has no SPICE")
    xml = typical_xml(short_dir, 0).replace(
        "<target dev='vda' bus='virtio'/>", "<target dev='hda' bus='ide'/>"
    )
    xml = xml.replace(
        "<graphics type='vnc' autoport='yes' listen='127.0.0.1'/>",
        "<graphics type='spice' autoport='yes' passwd='pw'/>",
    ).replace("<model type='vga'/>", "<model type='qxl'/>")
    xml = xml.replace(
        "<memballoon",
        "<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/></disk>"
        "<serial type='pty'><target port='1'/></serial><memballoon",
    )
    port = free_port()
    seen = run_guest(xml, short_dir, kvm=HAVE_KVM, ports=[port])
    assert seen["spice"]["enabled"] and seen["spice"]["port"] == port
    assert seen["spice"]["auth"] == "spice"  # ticketing on: the agent sets the password
    blocks = {b["device"]: b for b in seen["block"]}
    assert "inserted" in blocks["drive-ide0-0-0"] and "inserted" not in blocks["drive-ide0-1-0"]
    ptys = [c["filename"] for c in seen["chardev"] if c["label"] == "charserial1"]
    assert ptys and ptys[0].startswith("pty:/dev/pts/")
    assert seen["exit"] == 0
