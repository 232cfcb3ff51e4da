"""`ferry demo` as a new user runs it: own redis and hosts, two moves, a table, nothing left."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from scripts.testbed.stack import stop_pid, wait_for
from tests.conftest import pid_alive

DEADLINE_S = 120  # the promise: under two minutes on this machine


def _leftovers(marks: list[str], exclude: int) -> list[int]:
    """Live pids (other than `exclude`) whose command line contains one of `marks`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if any(m in cmdline for m in marks) and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _marks(out: str) -> list[str]:
    """What identifies the demo's processes: its state root and its redis address."""
    marks = [m.group(1) for m in re.finditer(r"state in (/tmp/ferry-demo-[^/\s)]+)", out)]
    marks += [m.group(1) for m in re.finditer(r"redis://(127\.0\.0\.1:\d+)/", out)]
    return sorted(set(marks))


def test_the_demo_moves_a_guest_there_and_back_prints_a_table_and_leaves_nothing_running(
        tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    log = tmp_path / "demo.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("ferry")), "demo"],
                                env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the demo stops what it started on Ctrl-C
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        rc = None
    finally:
        text = log.read_text(errors="replace")
        marks = _marks(text)
        left = _leftovers(marks, os.getpid()) if marks else []
        for pid in left:  # whatever the demo failed to stop, by pid
            stop_pid(pid, timeout=5)
        if proc.poll() is None:
            stop_pid(proc.pid)
            proc.wait(timeout=10)

    assert rc == 0, f"demo ended with {rc} (None: past {DEADLINE_S}s):\n{text}"
    assert any(m.startswith("/tmp/ferry-demo-") for m in marks), text
    assert any(m.startswith("127.0.0.1:") for m in marks), text
    assert re.search(r"guest \S+ running on alpha \(pid (\d+)\)", text), text
    assert re.search(r"on beta: running:migrated", text), text
    # The second move is of the paused guest (memory identity check), resumed after.
    assert "guest memory identical on both sides: True" in text, text
    assert re.search(r"on alpha: running:unpaused", text), text
    assert "migrations" in text and "downtime" in text, text
    assert re.search(r"alpha\s*->\s*beta.*\n(?:.*\n)*.*beta\s*->\s*alpha", text), text
    assert "demo done" in text, text
    assert left == [], f"the demo left processes running: {left}"
    guest_pid = int(re.search(r"running on alpha \(pid (\d+)\)", text).group(1))  # type: ignore[union-attr]
    wait_for(lambda: not pid_alive(guest_pid), 5, "the demo's guest to be gone")
    assert not any(Path(m).exists() for m in marks if m.startswith("/")), \
        "the demo left its state root behind"
