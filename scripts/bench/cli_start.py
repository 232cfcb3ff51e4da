"""`python -m scripts.bench.cli_start`: how soon a `ferry` command's first task is sent.

Starts its own redis-server and hosts alpha and beta, one small guest, then runs
`ferry list`, `ferry dominfo` and `ferry migrate` (the guest to the other host and
back) with the command's own client and with Celery's (FERRY_CLI_FAST_PATH=0),
interleaved, the order turned every round.  From the process start (just before
the fork) to the command's LPUSH as the broker saw it (a MONITOR connection's
server timestamps), and to the process's end; the CPU each run used (user +
system, which load does not inflate the way it inflates walls).  `ferry --help`
is timed to its end.  virsh is timed the same way only where it runs against a
local libvirtd (not on this machine: no libvirt installed).  Medians and p90.

ferry's modules are byte-compiled first, as a pip install does (`--source` leaves
them uncompiled: where PYTHONDONTWRITEBYTECODE is set and nothing compiled them, every
command compiles its ferry modules again, ~15-20 ms of each start).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from config.settings import load
from scripts.bench.report import machine
from scripts.testbed.guestimage import build_image
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import Stack, wait_for
from tasks.client import Client

OUT = Path(__file__).resolve().parent / "CLI_START.md"
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("config", "workers", "tasks", "scripts")
FERRY = str(Path(sys.executable).with_name("ferry"))
PATHS = {"own client": "1", "Celery": "0"}


@dataclass
class Run:
    command: str
    path: str
    to_lpush_ms: float | None
    wall_ms: float
    cpu_ms: float
    rc: int


class Pushes:
    """LPUSHes the broker executes, with its own timestamps (MONITOR)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.seen: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        try:
            with self.client.monitor() as mon:  # type: ignore[no-untyped-call]  # no hints
                for cmd in mon.listen():
                    text = str(cmd.get("command", ""))
                    if text.startswith("LPUSH host."):
                        with self.lock:
                            # whole: a migration's body (base64, first) is ~3 KB before
                            # the headers that name the task
                            self.seen.append((float(cmd["time"]), text))
        except redis.ConnectionError:
            pass  # the bench's redis-server stopped: the run is over

    def first_after(self, since: float, task: str) -> float | None:
        with self.lock:
            for stamp, text in self.seen:
                if stamp >= since and f"ferry.{task}" in text:
                    return stamp
        return None


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, float, int]:
    """(start, wall ms, CPU ms, exit status) of one process, output thrown away."""
    start = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = (time.perf_counter() - t0) * 1000
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        print(f"{' '.join(argv[1:])}: {err.strip()}", file=sys.stderr)
    return start, wall, (usage.ru_utime + usage.ru_stime) * 1000, proc.returncode


@dataclass
class Bench:
    stack: Stack
    pushes: Pushes
    client: Client
    where: str = "alpha"
    runs: list[Run] = field(default_factory=list)

    def env(self, fast: str) -> dict[str, str]:
        env = self.stack.env()
        env["FERRY_CLI_FAST_PATH"] = fast
        return env

    def one(self, command: str, path: str) -> None:
        task, argv = {
            "list": ("list", ["list", "-H", self.where, "--all"]),
            "dominfo": ("dominfo", ["dominfo", "-H", self.where, "cli1"]),
            "migrate": ("begin3", ["migrate", "-H", self.where, "cli1",
                                   "beta" if self.where == "alpha" else "alpha", "--live"]),
        }[command]
        start, wall, cpu, rc = timed([FERRY, *argv], self.env(PATHS[path]))
        pushed = wait_for(lambda: self.pushes.first_after(start, task), 10,
                          f"the LPUSH of {command}") if rc == 0 else None
        lpush = None if not isinstance(pushed, float) else (pushed - start) * 1000
        self.runs.append(Run(command, path, lpush, wall, cpu, rc))
        if command == "migrate" and rc == 0:
            self.where = "beta" if self.where == "alpha" else "alpha"


def run(rounds: int, root: Path) -> tuple[list[Run], list[tuple[float, float]]]:
    stack = Stack(root=root)
    try:
        stack.start_redis()
        for host in ("alpha", "beta"):
            stack.start_worker(host)
        client = Client(load({"FERRY_BROKER_URL": stack.broker_url}))
        image = build_image(root / "cli.img", dirty_mib=0)
        client.call("alpha", "define", xml=guest_xml("cli1", image, root / "cli1.serial",
                                                     memory_mib=64, domain_type="qemu"))
        client.call("alpha", "start", domain="cli1")
        bench = Bench(stack, Pushes(stack.redis_client()), client)
        time.sleep(0.5)  # MONITOR is listening
        helps: list[tuple[float, float]] = []
        order = [(c, p) for c in ("list", "dominfo", "migrate") for p in PATHS]
        for i in range(rounds):
            for command, path in order if i % 2 == 0 else order[::-1]:
                bench.one(command, path)
            _, wall, cpu, _ = timed([FERRY, "--help"], bench.env("1"))
            helps.append((wall, cpu))
        return bench.runs, helps
    finally:
        stack.stop(kill_guests=True)


def _stats(values: list[float]) -> str:
    if not values:
        return "- | -"  # median | p90
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"{statistics.median(values):.0f} | {p90:.0f}"  # two columns: median | p90


def bytecode(compiled: bool) -> None:
    """ferry's packages byte-compiled (as installed), or not and not to be (`--source`)."""
    packages = [str(ROOT / name) for name in PACKAGES]
    if compiled:
        subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], check=True,
                       stdout=subprocess.DEVNULL)
        return
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # the commands inherit it
    for package in packages:
        for cache in Path(package).rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)


def markdown(runs: list[Run], helps: list[tuple[float, float]], load1: float,
             compiled: bool = True) -> str:
    m = machine()
    lines = ["## CLI start-up", "",
             f"`python -m scripts.bench.cli_start` on {time.strftime('%Y-%m-%d %H:%M')}: "
             f"{m.get('nproc')} CPUs ({m.get('cpu_model')}), load average {load1:.1f} at the "
             "start (the machine is shared); ferry's modules "
             + ("byte-compiled first, as a pip install does." if compiled else
                "not byte-compiled, and no byte-code written (`--source`)."), "",
             "| command | client | n | start → LPUSH ms | p90 | whole command ms | p90 | "
             "CPU ms | p90 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for command in ("list", "dominfo", "migrate"):
        for path in PATHS:
            sel = [r for r in runs if r.command == command and r.path == path and r.rc == 0]
            lines.append(f"| {command} | {path} | {len(sel)} | "
                         f"{_stats([r.to_lpush_ms for r in sel if r.to_lpush_ms is not None])} | "
                         f"{_stats([r.wall_ms for r in sel])} | "
                         f"{_stats([r.cpu_ms for r in sel])} |")
    lines.append(f"| --help | own client | {len(helps)} | - | - | "
                 f"{_stats([w for w, _ in helps])} | {_stats([c for _, c in helps])} |")
    virsh = shutil.which("virsh")
    lines += ["", "virsh: " + ("installed, not measured here (needs a local libvirtd)" if virsh
                               else "not installed on this machine (no libvirt): no figure."),
              "`migrate`: the whole command includes the migration of a 64 MiB TCG guest."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.cli_start", description=__doc__)
    p.add_argument("--rounds", type=int, default=15, help="runs per command and client")
    p.add_argument("--source", action="store_true",
                   help="remove ferry's byte-code caches and write none (the commands "
                        "compile their modules at every start)")
    args = p.parse_args(argv)
    bytecode(compiled=not args.source)
    load1 = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="ferry-bcli-", dir="/tmp"))
    try:
        runs, helps = run(args.rounds, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = markdown(runs, helps, load1, compiled=not args.source)
    OUT.write_text(text)
    print(text)
    raw: list[dict[str, Any]] = [r.__dict__ for r in runs]
    print(json.dumps(raw)[:300], file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
