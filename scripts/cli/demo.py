"""`ferry demo`: a local ferry moves a running guest alpha -> beta -> alpha.

It uses its own redis-server and hosts (unless FERRY_BROKER_URL is set) in a
temporary state root, shows each move with a progress bar, the guest's
counter going on across the moves, and a summary table, then stops every
process it started, guests too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from config.settings import load
from scripts.cli.up import start_stack
from scripts.testbed.guestimage import build_image, serial_counters
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import free_port, qemu_writable, searchable, wait_for
from tasks.client import Client
from workers.errors import FerryError

NAME = "demo-guest"
MEMORY_MIB = 128


def _counter(serial: Path) -> int:
    try:
        seen = serial_counters(serial.read_text(errors="replace"))
    except FileNotFoundError:
        return 0
    return seen[-1] if seen else 0


def _move(console: Console, client: Client, src: str, dst: str) -> dict[str, Any]:
    job = client.migrate(NAME, src, dst, live=True)
    with Progress(TextColumn(f"{src} -> {dst}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), console=console,
                  transient=False) as bar:
        task = bar.add_task("move", total=100)
        while not job.done():
            try:
                info = job.info()
            except FerryError:  # Confirm removed the source's transient domain just before
                info = {}       # the chain's result landed: the next look sees it done
            if info.get("data_total"):
                done = 100 * (1 - (info["data_remaining"] or 0) / info["data_total"])
                bar.update(task, completed=done)
            time.sleep(0.1)
        summary: dict[str, Any] = job.wait(timeout=120)
        bar.update(task, completed=100)
    return summary


def _memory(client: Client, host: str, path: Path) -> str:
    """sha256 of the guest's whole memory, pmemsave'd by QEMU on `host` (into a
    directory its user owns: QEMU opens the file itself, confined)."""
    out = qemu_writable(path.with_name(f"{path.name}.d"), client.settings) / path.name
    command = json.dumps({"execute": "pmemsave", "arguments": {
        "val": 0, "size": MEMORY_MIB << 20, "filename": str(out)}})
    client.call(host, "qemu_monitor_command", domain=NAME, command=command, timeout=60)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    shutil.rmtree(out.parent)
    return digest


def _table(moves: list[dict[str, Any]]) -> Table:
    table = Table(title="migrations")
    for col in ("move", "phases (ms)", "total ms", "downtime ms", "MiB sent", "MiB/s"):
        table.add_column(col)
    for s in moves:
        st = s["statistics"]
        phases = " ".join(f"{p['phase']}={p['elapsed_ms']:.0f}" for p in s["phases"])
        total = sum(p["elapsed_ms"] for p in s["phases"])
        mib = st.get("memory_processed", 0) / 1048576
        table.add_row(f"{s['source']}->{s['dest']}", phases, f"{total:.0f}",
                      str(st.get("downtime")), f"{mib:.1f}",
                      f"{st.get('memory_bps', 0) / 1048576:.0f}")
    return table


def run_demo(args: argparse.Namespace) -> int:
    console = Console()
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-demo-", dir="/tmp")))
    stack = None
    try:
        t0 = time.monotonic()
        stack = start_stack(args, root, redis_port=free_port())
        client = Client(load({"FERRY_BROKER_URL": stack.broker_url}))
        disk = build_image(root / "guest.img", dirty_mib=16, rate_mib_s=32)
        serial = root / "guest.serial"
        client.call("alpha", "define", xml=guest_xml(NAME, disk, serial, memory_mib=MEMORY_MIB))
        info = client.call("alpha", "start", domain=NAME)
        console.print(f"guest {NAME} running on alpha (pid {info['pid']}), "
                      "dirtying 16 MiB at 32 MiB/s")
        wait_for(lambda: _counter(serial) > 5, 30, "the guest's counter")
        moves = []
        for src, dst, check_memory in (("alpha", "beta", False), ("beta", "alpha", True)):
            before = _counter(serial)
            if check_memory:  # paused, so the bytes cannot change: they must match
                client.call(src, "suspend", domain=NAME)
                digest = _memory(client, src, root / "before.mem")
            moves.append(_move(console, client, src, dst))
            if check_memory:
                same = _memory(client, dst, root / "after.mem") == digest
                console.print(f"  guest memory identical on both sides: {same}")
                if not same:
                    return 1
                client.call(dst, "resume", domain=NAME)
            wait_for(lambda: _counter(serial) > before + 5, 30, "the counter")  # noqa: B023
            state = client.call(dst, "dominfo", domain=NAME)
            console.print(f"  on {dst}: {state['state']}:{state['reason']}, "
                          f"counter {before} -> {_counter(serial)}")
        console.print(_table(moves))
        client.call("alpha", "destroy", domain=NAME)
        console.print(f"demo done in {time.monotonic() - t0:.1f}s")
        return 0
    finally:
        if stack is not None:
            stack.stop(kill_guests=True)
        shutil.rmtree(root, ignore_errors=True)
