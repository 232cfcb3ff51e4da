"""The Linux test guest really boots under QEMU: it ticks with one boot id and serves TCP echo.

Direct kernel boot of Debian's kernel with the busybox initramfs, a virtio NIC on QEMU
user networking, the echo and HTTP ports forwarded to free loopback ports.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scripts.testbed.linuxguest import (
    ECHO_PORT,
    HTTP_PORT,
    USER_NET_IP,
    LinuxGuest,
    LinuxGuestError,
    Tick,
    build_guest,
    continuity_problem,
    kernel_cmdline,
    kvm_usable,
    parse_ready,
    parse_ticks,
    qemu_argv,
    read_serial,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no qemu-system-x86_64"),
]
# Under TCG on a busy 2-core machine the first tick comes after 5-15 s.
BOOT_DEADLINE_S = 120.0
IO_DEADLINE_S = 20.0


@pytest.fixture(scope="module")
def guest() -> LinuxGuest:
    try:
        return build_guest()
    except LinuxGuestError as exc:
        pytest.skip(f"no Linux guest here: {exc}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Booted:
    """One QEMU running the guest; everything read from outside it (serial log, ports)."""

    def __init__(self, proc: subprocess.Popen[bytes], serial: Path, log: Path, started: float,
                 echo_port: int, http_port: int) -> None:
        self.proc, self.serial, self.log, self.started = proc, serial, log, started
        self.echo_port, self.http_port = echo_port, http_port

    def why(self) -> str:
        return (f"serial: {read_serial(self.serial)[-600:]!r}; "
                f"qemu: {self.log.read_bytes()[-400:]!r}")

    def ticks(self) -> list[Tick]:
        return parse_ticks(read_serial(self.serial))

    def wait_ticks(self, count: int, deadline_s: float) -> list[Tick]:
        """At least `count` ticks, polling the serial log until `deadline_s` from now."""
        deadline = time.monotonic() + deadline_s
        while True:
            ticks = self.ticks()
            if len(ticks) >= count:
                return ticks
            code = self.proc.poll()
            assert code is None, f"QEMU exited with {code}; {self.why()}"
            assert time.monotonic() < deadline, (
                f"{len(ticks)} of {count} ticks after {deadline_s}s; {self.why()}")
            time.sleep(0.05)


@pytest.fixture
def boot(guest: LinuxGuest, tmp_path: Path) -> Iterator[Callable[[str], Booted]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(cmdline: str) -> Booted:
        serial, log = tmp_path / "serial.log", tmp_path / "qemu.log"
        echo_port, http_port = free_port(), free_port()
        argv = qemu_argv(guest, serial, cmdline=cmdline,
                         forwards={echo_port: ECHO_PORT, http_port: HTTP_PORT})
        with open(log, "wb") as out:
            started = time.monotonic()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        procs.append(proc)
        return Booted(proc, serial, log, started, echo_port, http_port)

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def connect_echo(port: int, deadline_s: float) -> socket.socket:
    """A connection to the guest's echo service that has echoed once.

    QEMU's user networking accepts on the host before the guest does and closes the
    connection when the guest refuses it, so a connection counts only once it echoes.
    """
    deadline = time.monotonic() + deadline_s
    last = "nothing tried"
    while time.monotonic() < deadline:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            if echo(sock, b"hello\n") == b"hello\n":
                return sock
            last = "closed without an echo"
        except OSError as exc:
            last = repr(exc)
        sock.close()
        time.sleep(0.1)
    raise AssertionError(f"echo service on port {port} not answering: {last}")


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.settimeout(IO_DEADLINE_S)
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.parametrize("network", ["static", "dhcp"])
def test_linux_guest_boots_ticks_and_serves(
    boot: Callable[[str], Booted], network: str, record_property: Callable[[str, object], None]
) -> None:
    cmdline = kernel_cmdline(USER_NET_IP, "10.0.2.2") if network == "static" else kernel_cmdline()
    vm = boot(cmdline)
    first = vm.wait_ticks(1, BOOT_DEADLINE_S)
    boot_s = time.monotonic() - vm.started
    record_property("boot_to_first_tick_s", round(boot_s, 2))
    print(f"\nfirst tick {boot_s:.2f}s after start ({'kvm' if kvm_usable() else 'tcg'}, "
          f"{network}), guest uptime {first[0].uptime_s}s")

    boot_id = first[0].boot_id
    assert parse_ready(read_serial(vm.serial)) == [
        (boot_id, USER_NET_IP if network == "static" else "dhcp")], vm.why()

    with contextlib.ExitStack() as stack:
        long_lived = stack.enter_context(connect_echo(vm.echo_port, IO_DEADLINE_S))
        other = stack.enter_context(connect_echo(vm.echo_port, IO_DEADLINE_S))
        payload = secrets.token_bytes(100_000)
        assert echo(other, payload) == payload
        # No proxy from the environment: the guest is on this host's loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{vm.http_port}/", timeout=IO_DEADLINE_S) as page:
            assert page.read().decode().split() == ["ferry-guest", boot_id]

        # A second later the guest is the same boot, still counting, and the first
        # connection still echoes.
        ticks = vm.wait_ticks(len(vm.ticks()) + 10, IO_DEADLINE_S)
        assert echo(long_lived, b"still there\n") == b"still there\n"
        other.close()
        assert echo(long_lived, b"and again\n") == b"and again\n"

    assert continuity_problem(ticks) is None, vm.why()
    assert {t.boot_id for t in ticks} == {boot_id}
    assert ticks[-1].counter >= 11 and ticks[-1].uptime_s > first[0].uptime_s
    assert ticks[-1].uptime_s - ticks[0].uptime_s >= 0.9
