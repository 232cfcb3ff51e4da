"""Where the CPU goes during one migration: per process (and tunnel thread), from /proc.

A thread samples /proc/PID/task/TID/stat of the benchmark's processes every
`interval` seconds while a migration runs, so a QEMU that starts (the dest)
or exits during the sample is counted too (up to its last look, at most one
interval short).  Threads seen at the first look count from there, later ones
from zero.  Labels: the fixed pids given (workers, redis, this process), a
QEMU whose argv names `guest` (the migrating guest: its first process is
"qemu src", a new one "qemu dst"), any other QEMU under `root` ("qemu idle");
worker threads named ferry-tun* count as "<worker> tunnel".
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from types import TracebackType

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
TUNNEL_THREAD = "ferry-tun"  # ferry-tunnel (data), ferry-tun-back (return path)


def _machine() -> tuple[int, int]:
    """(busy, idle) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v[:8]) - idle, idle


def _threads(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (comm, utime + stime jiffies); empty once the process is gone."""
    out = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                raw = (task / "stat").read_text()
                comm = raw[raw.index("(") + 1:raw.rindex(")")]
                f = raw[raw.rindex(")") + 2:].split()
                out[int(task.name)] = (comm, int(f[11]) + int(f[12]))
    return out


class CpuSampler:
    """`with CpuSampler(...) as s:` around a migration; then `s.result()` (CPU seconds)."""

    def __init__(self, fixed: dict[int, str], guest: str, root: str,
                 interval: float = 0.1) -> None:
        self.fixed, self.guest, self.root, self.interval = fixed, guest.encode(), root, interval
        self.labels: dict[int, str | None] = {}
        self.first: dict[tuple[int, int], int] = {}
        self.last: dict[tuple[int, int], int] = {}
        self.thread_label: dict[tuple[int, int], str] = {}
        self.started = False
        self.stop = threading.Event()
        self.worker = threading.Thread(target=self._run, name="bench-cpu", daemon=True)

    def _label(self, pid: int) -> str | None:
        if pid in self.fixed:
            return self.fixed[pid]
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if b"qemu-system" not in argv.split(b"\0", 1)[0] or self.root.encode() not in argv:
            return None
        if b"guest=" + self.guest + b"," in argv or b"guest=" + self.guest + b"\0" in argv:
            return "qemu dst" if self.started else "qemu src"
        return "qemu idle"

    def _look(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid not in self.labels:
                self.labels[pid] = self._label(pid)
            label = self.labels[pid]
            if label is None:
                continue
            for tid, (comm, jiffies) in _threads(pid).items():
                key = (pid, tid)
                if key not in self.last:
                    self.first[key] = jiffies if not self.started else 0
                    self.thread_label[key] = (f"{label} tunnel"
                                              if comm.startswith(TUNNEL_THREAD) else label)
                self.last[key] = jiffies

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self._look()

    def __enter__(self) -> CpuSampler:
        self.machine0 = _machine()
        self.t0 = time.monotonic()
        self._look()
        self.started = True
        self.worker.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop.set()
        self.worker.join()
        self._look()
        self.elapsed = time.monotonic() - self.t0
        self.machine1 = _machine()

    def result(self) -> dict[str, float]:
        """CPU seconds per label, plus "machine busy", "machine idle" and "elapsed"."""
        out: dict[str, float] = {}
        for key, last in self.last.items():
            label = self.thread_label[key]
            out[label] = out.get(label, 0.0) + (last - self.first[key]) * TICK_S
        ours = sum(out.values())
        busy = (self.machine1[0] - self.machine0[0]) * TICK_S
        out["other processes"] = max(0.0, busy - ours)
        out["machine busy"] = busy
        out["machine idle"] = (self.machine1[1] - self.machine0[1]) * TICK_S
        out["elapsed"] = self.elapsed
        return {k: round(v, 3) for k, v in out.items()}
