"""`ferry demo`: a local ferry, one guest, shown running; everything stopped after.

It uses its own redis-server and hosts (unless FERRY_BROKER_URL is set) in
a temporary state root, and stops every process it started, guests too.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from config.settings import load
from scripts.guestimage import build_image, serial_counters
from scripts.guestxml import guest_xml
from scripts.stack import free_port, wait_for
from scripts.up import start_stack
from tasks.client import Client


def _counter(serial: Path) -> int:
    try:
        seen = serial_counters(serial.read_text(errors="replace"))
    except FileNotFoundError:
        return 0
    return seen[-1] if seen else 0


def run_demo(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="ferry-demo-", dir="/tmp"))
    stack = None
    try:
        t0 = time.monotonic()
        stack = start_stack(args, root, redis_port=free_port())
        client = Client(load({"FERRY_BROKER_URL": stack.broker_url}))
        disk = build_image(root / "guest.img", dirty_mib=16, rate_mib_s=32)
        serial = root / "guest.serial"
        name = "demo-guest"
        client.call("alpha", "define", xml=guest_xml(name, disk, serial, memory_mib=128))
        info = client.call("alpha", "start", domain=name)
        print(f"guest {name} started on alpha: {info['state']}:{info['reason']} "
              f"pid {info['pid']}")
        for _ in range(3):
            last = _counter(serial)
            wait_for(lambda: _counter(serial) > last + 5, 20, "the guest's counter")  # noqa: B023
            print(f"  serial counter: {_counter(serial)}")
        for h in client.hosts():
            print(f"host {h['name']}: alive={h['alive']} guests={h['guests']}")
        client.call("alpha", "destroy", domain=name)
        print(f"demo done in {time.monotonic() - t0:.1f}s")
        return 0
    finally:
        if stack is not None:
            stack.stop(kill_guests=True)
        shutil.rmtree(root, ignore_errors=True)
