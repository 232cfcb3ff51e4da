"""Helpers of the storage copy tests: a guest that logs its counters to a qcow2 disk, the
dest's definition with its own disk path, and the checks that nothing was lost or left.

Both hosts of the test stack run on this machine, so a guest's disk has one path on
the source and another on the dest (the dest's definition comes in with --xml, whose
disk source path may differ: the ABI check allows it).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from scripts.testbed.guestimage import build_image, read_disk_log
from scripts.testbed.stack import Stack
from tasks.client import Client
from tests.conftest import Guest, qemu_pids_of

LOG_SECTORS = 4096  # the guest's disk log ring: 2 MiB from 1 MiB on


def make_log_image(root: Path, random_mib: int = 24, size_mib: int = 64,
                   ram_random_mib: int = 0) -> Path:
    """A qcow2 (128 KiB clusters) whose guest logs every counter to its disk every
    20 ms, with `random_mib` MiB of random data at 8 MiB so a copy takes a moment (and
    `ram_random_mib` MiB of random RAM, so its RAM takes a moment too)."""
    raw = build_image(root / "log.raw", log_sectors=LOG_SECTORS, size=size_mib << 20,
                      counter_interval_ms=20, random_mib=ram_random_mib, rate_mib_s=0)
    with open(raw, "r+b") as f:
        f.seek(8 << 20)
        f.write(os.urandom(random_mib << 20))
    out = root / "log.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=131072", str(raw),
             str(out))
    raw.unlink()
    return out


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                          text=True).stdout


def image_info(path: Path) -> dict[str, Any]:
    return dict(json.loads(qemu_img("info", "-U", "--output=json", str(path))))


def same_images(a: Path, b: Path) -> bool:
    done = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)],
                          capture_output=True, text=True)
    return done.returncode == 0


def dest_xml(guest: Guest, dest_disk: Path) -> str:
    return guest.xml.replace(f"file='{guest.disk}'", f"file='{dest_disk}'")


def boot(client: Client, guest: Guest, host: str = "alpha") -> None:
    client.call(host, "define", xml=guest.xml)
    client.call(host, "start", domain=guest.name)


def qmp(client: Client, host: str, name: str, cmd: str, **args: Any) -> Any:
    msg = {"execute": cmd, **({"arguments": args} if args else {})}
    return client.call(host, "qemu_monitor_command", domain=name, command=json.dumps(msg))


def no_copy_left_in(client: Client, host: str, name: str) -> bool:
    """No block job, nbd node or backup round's snapshot (fleecing node) of a storage copy
    in the guest's QEMU."""
    jobs = qmp(client, host, name, "query-block-jobs")
    nodes = qmp(client, host, name, "query-named-block-nodes", flat=True)
    return not jobs and not [n for n in nodes
                             if n["node-name"].startswith(("migration-", "fleece-"))]


def log_complete(client: Client, host: str, guest: Guest, disk: Path) -> None:
    """Every counter the guest printed is on `disk` (suspended for the read: a stop
    flushes QEMU's qcow2 caches), none corrupt; the guest's run state is restored."""
    state = client.call(host, "dominfo", domain=guest.name)["state"]
    if state == "running":
        client.call(host, "suspend", domain=guest.name)
    try:
        printed = guest.counters()[-1]
        log = read_disk_log(disk, "qcow2", LOG_SECTORS)
        assert log.corrupt == (), f"corrupt log slots {log.corrupt}"
        assert log.missing(printed) == [], f"printed but not on {disk}: " \
            f"{log.missing(printed)[:10]}"
    finally:
        if state == "running":
            client.call(host, "resume", domain=guest.name)


def listening(first: int, last: int) -> list[int]:
    """Ports in [first, last] with a listening TCP socket."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                port = int(cols[1].rsplit(":", 1)[1], 16)
                if cols[3] == "0A" and first <= port <= last:
                    found.add(port)
    return sorted(found)


def source_untouched(client: Client, guest: Guest, dest_disk: Path,
                     src: str = "alpha", dst: str = "beta") -> None:
    """After a failed storage copy: the guest runs on the source alone, on its own disk
    with every write it made, and nothing is left on the dest or in the source QEMU."""
    info = client.call(src, "dominfo", domain=guest.name)
    assert info["state"] == "running", info
    assert qemu_pids_of(guest.uuid) == [info["pid"]]
    assert all(d["name"] != guest.name for d in client.call(dst, "list", all=True))
    assert not dest_disk.exists(), f"{dest_disk} was left on the dest"
    assert no_copy_left_in(client, src, guest.name)
    log_complete(client, src, guest, guest.disk)
    guest.wait_counter_above(guest.counters()[-1] + 3, timeout=30)


class JobWatch:
    """domjobinfo of a running migration, sampled until it ends (the samples are looked
    at afterwards, never used to time anything)."""

    def __init__(self, client: Client, host: str, name: str) -> None:
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(client, host, name),
                                        daemon=True)
        self._thread.start()

    def _run(self, client: Client, host: str, name: str) -> None:
        while not self._stop.is_set():
            try:
                info = client.call(host, "domjobinfo", domain=name, timeout=10)
            except Exception:
                info = {}
            if info.get("type") == "unbounded":
                self.samples.append(info)
            self._stop.wait(0.1)

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(timeout=15)
        return self.samples


def kept_records(stack: Stack, host: str) -> list[dict[str, Any]]:
    folder = stack.workers[host].state_dir / "storage" / "kept"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def expire(stack: Stack, host: str, image: Path) -> None:
    """Move a kept image's end of keep time to the past (as if the window passed)."""
    folder = stack.workers[host].state_dir / "storage" / "kept"
    for path in folder.glob("*.json"):
        rec = json.loads(path.read_text())
        if rec["path"] == str(image):
            path.write_text(json.dumps({**rec, "until": time.time() - 1}))
            return
    raise AssertionError(f"no kept record of {image} on {host}")
