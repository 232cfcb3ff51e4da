"""A host's state files: what goes when a guest's QEMU is gone."""

from __future__ import annotations

from pathlib import Path

from workers.store import StateStore

UUID = "705ae3c3-8748-4a93-a410-dbe59f0bb343"


def test_a_gone_qemu_leaves_no_status_pid_file_or_monitor_socket_but_its_log(
        tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    kept = [store.qemu_log("g"), store.run / "other.xml"]
    for path in (store.status_path("g"), store.pidfile("g"), store.qmp_socket(UUID), *kept):
        path.write_text("x")
    store.forget_runtime("g", UUID)
    assert sorted(store.run.iterdir()) == sorted(kept)
    store.forget_runtime("g", UUID)  # nothing left to remove is no error
