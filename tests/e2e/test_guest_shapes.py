"""Guests that are not the one test guest, each migrated once with its memory compared.

A qcow2 disk, a virtio disk, two vCPUs, kvmclock left on: each guest is
paused, its memory saved from 1 MiB up (`pmemsave`; one page of the legacy
BIOS shadow below 1 MiB differs after any QEMU migration), moved, and saved
again on the dest, where it stays paused; QEMU itself says the dest has the
shape asked for.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tasks.client import Client
from tests.conftest import Guest, kvm_available, pmemsave

MIB = 1 << 20
MEMORY_MIB = 64


@pytest.fixture(scope="module")
def qcow2_image(image_dir: Path, base_image: Path) -> Path:
    out = image_dir / "base.qcow2"
    if not out.exists():
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(base_image),
                        str(out)], check=True, capture_output=True, timeout=60)
    return out


def _qmp(client: Client, host: str, name: str, command: str, **arguments: Any) -> Any:
    cmd: dict[str, Any] = {"execute": command}
    if arguments:
        cmd["arguments"] = arguments
    return client.call(host, "qemu_monitor_command", domain=name, command=json.dumps(cmd),
                       timeout=120)


def _memory_digest(client: Client, host: str, guest: Guest, path: Path) -> str:
    """sha256 of guest memory [1 MiB, end), saved by QEMU on `host` (into a directory its
    confined user may write: conftest.pmemsave)."""
    return pmemsave(client, host, guest.name, MEMORY_MIB * MIB, path, start=MIB)


def _block(client: Client, host: str, guest: Guest) -> dict[str, Any]:
    (disk,) = [b for b in _qmp(client, host, guest.name, "query-block") if b.get("inserted")]
    return dict(disk)


SHAPES: dict[str, tuple[dict[str, Any], Callable[[Client, str, Guest], None]]] = {
    "qcow2-disk": ({"disk_format": "qcow2"}, lambda c, h, g: _expect(
        _block(c, h, g)["inserted"]["image"]["format"] == "qcow2", "a qcow2 disk")),
    "virtio-disk": ({"disk_bus": "virtio"}, lambda c, h, g: _expect(
        "virtio" in _block(c, h, g)["qdev"], "a virtio disk")),
    "two-vcpus": ({"vcpus": 2}, lambda c, h, g: _expect(
        len(_qmp(c, h, g.name, "query-cpus-fast")) == 2, "two vCPUs")),
    "kvmclock-on": ({"kvmclock": True}, lambda c, h, g: _expect(
        _qmp(c, h, g.name, "qom-get", path="/machine/unattached/device[0]",
             property="kvmclock") is True, "kvmclock on the CPU")),
}


def _expect(ok: bool, what: str) -> None:
    assert ok, f"the QEMU is not what the definition asked for: {what}"


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_guest_of_another_shape_moves_with_its_memory_intact(
        shape: str, client: Client, make_guest: Callable[..., Guest], qcow2_image: Path,
        tmp_path: Path) -> None:
    options, check = SHAPES[shape]
    if shape == "kvmclock-on" and not kvm_available():
        pytest.skip("kvmclock exists only under KVM, and /dev/kvm is not usable here")
    image = qcow2_image if options.get("disk_format") == "qcow2" else None
    guest = make_guest(memory_mib=MEMORY_MIB, image=image, **options)
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    guest.wait_counter_above(2)
    check(client, "alpha", guest)
    client.call("alpha", "suspend", domain=guest.name)
    before = _memory_digest(client, "alpha", guest, tmp_path / "src.mem")

    summary = client.migrate(guest.name, "alpha", "beta", live=True).wait(timeout=120)

    assert summary["result"] == "completed"
    info = client.call("beta", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("paused", "user")
    check(client, "beta", guest)
    assert _memory_digest(client, "beta", guest, tmp_path / "dst.mem") == before
    client.call("beta", "resume", domain=guest.name)
    guest.wait_counter_above(guest.counters()[-1])
