"""Fixtures that start real parts: redis-server, `ferry worker` processes, QEMU guests.

Everything started here is stopped by pid at the end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from config.settings import load
from scripts.guestxml import guest_xml
from scripts.stack import Stack, wait_for
from tasks.client import Client

HOSTS = ("alpha", "beta")


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    # A short root: unix socket paths must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="ferry-", dir="/tmp"))
    st = Stack(root=root, log_level="DEBUG")
    try:
        st.start_redis()
        for name in HOSTS:
            st.start_worker(name, wait=False)
        for name in HOSTS:
            proc = st.workers[name].proc
            assert proc is not None
            st.wait_alive(name, proc.pid)
        yield st
    finally:
        st.stop(kill_guests=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def client(stack: Stack) -> Client:
    return Client(load({"FERRY_BROKER_URL": stack.broker_url}))


@dataclass
class CliResult:
    rc: int
    out: str
    err: str


@pytest.fixture
def ferry(stack: Stack) -> Callable[..., CliResult]:
    """Run the real `ferry` command against the test stack."""
    exe = str(Path(sys.executable).with_name("ferry"))

    def run(*args: str, timeout: float = 60) -> CliResult:
        proc = subprocess.run([exe, *args], env=stack.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture(scope="session")
def image_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ferry-img-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def base_image(image_dir: Path) -> Path:
    from scripts.guestimage import build_image

    return build_image(image_dir / "base.img", dirty_mib=4, rate_mib_s=4)


@dataclass
class Guest:
    name: str
    uuid: str
    xml: str
    disk: Path
    serial: Path

    def counters(self) -> list[int]:
        from scripts.guestimage import serial_counters

        try:
            return serial_counters(self.serial.read_text(errors="replace"))
        except FileNotFoundError:
            return []

    def wait_counter_above(self, value: int, timeout: float = 20) -> int:
        def above() -> int:
            seen = self.counters()
            return seen[-1] if seen and seen[-1] > value else 0

        return int(wait_for(above, timeout, f"{self.name}'s serial counter to pass {value}"))


@pytest.fixture
def make_guest(tmp_path: Path, base_image: Path, client: Client) -> Iterator[Callable[..., Guest]]:
    """A fresh guest definition (own disk copy and serial log); not yet defined.

    Whatever the test left of its guests on any host is destroyed and undefined after it.
    """
    made: list[Guest] = []

    def make(memory_mib: int = 64, image: Path | None = None, **kw: object) -> Guest:
        name = f"g-{uuid.uuid4().hex[:8]}"
        disk = tmp_path / f"{name}.img"
        shutil.copyfile(image or base_image, disk)
        serial = tmp_path / f"{name}.serial"
        dom_uuid = str(uuid.uuid4())
        xml = guest_xml(name, disk, serial, memory_mib=memory_mib, uuid=dom_uuid, **kw)  # type: ignore[arg-type]
        guest = Guest(name, dom_uuid, xml, disk, serial)
        made.append(guest)
        return guest

    yield make
    for guest in made:
        for host in HOSTS:
            for task in ("destroy", "undefine"):
                with contextlib.suppress(Exception):
                    client.call(host, task, domain=guest.name, timeout=30)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kvm_available() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)
