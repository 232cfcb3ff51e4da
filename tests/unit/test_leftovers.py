"""The leftover check finds what a test left on a stack, and lets go of what went away."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from scripts.testbed.leftovers import Snapshot, left_over, snapshot, wait_left_over
from scripts.testbed.stack import Stack, Worker, free_port


def test_a_process_naming_the_stack_root_is_left_over_until_it_exits(tmp_path: Path) -> None:
    stack = Stack(root=tmp_path)
    before = snapshot([stack])
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             f"{tmp_path}/alpha/run/x.pid"])
    try:
        found = wait_left_over(before, [stack], timeout=0.2)
        assert found == [f"process {proc.pid}: {sys.executable} -c import time; "
                         f"time.sleep(60) {tmp_path}/alpha/run/x.pid"]
    finally:
        proc.kill()
        proc.wait()
    assert wait_left_over(before, [stack], timeout=5) == []


def test_only_what_is_new_counts() -> None:
    before = Snapshot({"a": "thing a", "b": "thing b"})
    after = Snapshot({"b": "thing b", "c": "thing c"})
    assert left_over(before, after) == ["thing c"]
    assert left_over(after, after) == []


def test_a_listening_socket_in_a_running_stacks_migration_ports_is_left_over(
        tmp_path: Path) -> None:
    port = free_port()
    worker = Worker("alpha", "u", tmp_path / "alpha", env={"FERRY_MIGRATION_PORTS":
                                                             f"{port}-{port}"})
    # A running stack: its worker runs (here, any process of ours).
    worker.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stack = Stack(root=tmp_path, workers={"alpha": worker})
    (tmp_path / "alpha" / "run").mkdir(parents=True)
    (tmp_path / "alpha" / "run" / "g.log").write_text("QEMU's log stays")
    try:
        before = snapshot([stack])
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            s.listen()
            (tmp_path / "alpha" / "run" / "g.xml").write_text("<domstatus/>")
            found = left_over(before, snapshot([stack]))
        assert any(f"port {port} listening" in line for line in found), found
        assert f"state file {tmp_path}/alpha/run/g.xml" in found
        assert not any("g.log" in line for line in found)
        (tmp_path / "alpha" / "run" / "g.xml").unlink()
        assert left_over(before, snapshot([stack])) == []
    finally:
        worker.proc.kill()
        worker.proc.wait()
