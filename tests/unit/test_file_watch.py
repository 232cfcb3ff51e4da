"""The scale bench's watch reads the status files the host agent writes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from scripts.testbed.fleet_scale import FileWatch
from workers.store import StateStore


def _status(store: StateStore, name: str, state: str, pid: int) -> None:
    store.save_status(name, state=state, reason="booted", pid=pid,
                      domain_xml=f"<domain type='qemu'><name>{name}</name></domain>")


def test_a_guest_counts_as_running_only_in_state_running_with_a_live_qemu(
        tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    _status(store, "up", "running", os.getpid())
    _status(store, "stopped", "paused", os.getpid())
    _status(store, "gone", "running", dead.pid)
    assert FileWatch({}).running(store.run) == frozenset({"up"})
