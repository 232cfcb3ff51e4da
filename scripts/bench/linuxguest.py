"""`python -m scripts.bench.linuxguest`: the real Linux guest under load, managed vs p2p.

Two namespace hosts with a guest LAN (scripts/testbed/fleet.py, guestlan.py); the
Linux test guest (scripts/testbed/linuxguest.py) on a bridge, with a writer
rewriting `--dirty` MiB of its RAM as fast as it can; migrated back and forth,
managed and peer-to-peer interleaved (the direction alternates, so each mode
runs both ways).  For every migration: the downtime QEMU reports, and the
downtime the network sees: the longest run of lost replies to pings every 10 ms
from the test's switch, and the longest gap between two replies.  Also the TCP
echo connection (open across all of them) and the guest's boot continuity.
Medians per mode and dirty size; not a pass/fail test.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from config.settings import load
from scripts.bench.report import machine
from scripts.testbed.fleet import Fleet
from scripts.testbed.guestlan import GUEST_BRIDGE, GuestLan, Pinger
from scripts.testbed.linuxguest import (
    ECHO_PORT,
    build_guest,
    continuity_problem,
    copied_to,
    domain_xml,
    kernel_cmdline,
    parse_ticks,
    read_serial,
)
from scripts.testbed.stack import wait_for
from tasks.client import Client

OUT = Path(__file__).resolve().parent / "LINUXGUEST.md"
HOSTS = ("la", "lb")
QUIET_S = 3.0  # after boot and between migrations: the announcements are over


@dataclass
class Sample:
    dirty_mib: int
    mode: str
    qemu_downtime_ms: float
    ping_lost_in_row: int
    ping_gap_ms: float
    total_ms: float
    echo_ok: bool


def _echo(sock: socket.socket, data: bytes) -> bool:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        if not chunk:
            return False
        got += chunk
    return got == data


def _connect(address: str, deadline_s: float) -> socket.socket:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            sock = socket.create_connection((address, ECHO_PORT), timeout=5)
            sock.settimeout(30)
            if _echo(sock, b"hello\n"):
                return sock
            sock.close()
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def run_dirty(client: Client, lan: GuestLan, work: Path, dirty: int, runs: int,
              memory_mib: int) -> list[Sample]:
    guest = copied_to(build_guest(), work / "linux")  # where a confined QEMU reads it
    name, mac, addr = f"lg-{uuid.uuid4().hex[:6]}", "52:54:00:be:00:01", lan.guest_ip(7)
    serial = work / f"{name}.serial"
    xml = domain_xml(name, guest, serial, mac=mac, bridge=GUEST_BRIDGE, memory_mib=memory_mib,
                     cmdline=kernel_cmdline(f"{addr}/24", dirty_mib=dirty or None,
                                            extra=["nokaslr"]),
                     domain_type="qemu")
    client.call(HOSTS[0], "define", xml=xml)
    client.call(HOSTS[0], "start", domain=name)
    ready = "dirtying" if dirty else "ready"
    wait_for(lambda: f"ferry-guest {ready}" in read_serial(serial), 300, "the guest")
    sock = _connect(addr, 60)
    # Let the guest settle after boot (QEMU 7.2 under TCG sometimes freezes a guest
    # migrated while busy: docs/limits.md).
    time.sleep(QUIET_S)
    samples: list[Sample] = []
    where = 0
    try:
        for i in range(runs * 2):
            mode = ("managed", "p2p")[(i + i // 2) % 2]  # ABBA order
            src, dst = HOSTS[where], HOSTS[1 - where]
            time.sleep(QUIET_S if i else 0)
            pinger = Pinger(addr, 0.01).start()
            time.sleep(0.5)
            t0 = time.perf_counter()
            summary = client.migrate(name, src, dst, live=True, p2p=mode == "p2p").wait(
                timeout=300)
            total = (time.perf_counter() - t0) * 1000
            time.sleep(1.5)
            report = pinger.stop()
            where = 1 - where
            stats = summary.get("statistics") or {}
            try:
                ok = _echo(sock, f"run {i}\n".encode())
            except OSError:
                ok = False
            if not ok:  # what the frozen guest's vCPU is doing (nokaslr: System.map applies)
                for cmd in ("info registers", "x/4i $pc", "info irq"):
                    print(client.call(dst, "qemu_monitor_command", domain=name, hmp=True,
                                      command=cmd), flush=True)
            samples.append(Sample(dirty, mode, float(stats.get("downtime") or 0),
                                  report.longest_loss, report.longest_gap_ms, total, ok))
            print(f"dirty {dirty} {mode} {src}->{dst}: QEMU downtime {stats.get('downtime')} "
                  f"ms, pings lost in a row {report.longest_loss}, gap "
                  f"{report.longest_gap_ms:.0f} ms, total {total:.0f} ms, echo {ok}",
                  flush=True)
        problem = continuity_problem(parse_ticks(read_serial(serial)))
        if problem:
            raise RuntimeError(f"the guest did not keep running: {problem}")
    finally:
        sock.close()
        with contextlib.suppress(Exception):
            client.call(HOSTS[where], "destroy", domain=name)
    return samples


def markdown(samples: list[Sample], args: argparse.Namespace, started: str) -> str:
    m = machine()
    lines = ["## Linux guest under load", "",
             f"`python -m scripts.bench.linuxguest --runs {args.runs} --dirty "
             f"{','.join(map(str, args.dirty))}` on {started}: {m.get('nproc')} CPUs "
             f"({m.get('cpu_model')}), {m.get('qemu')}, guest {args.memory} MiB under TCG on "
             "a bridge in a namespace host; medians (max).", "",
             "| dirty MiB | mode | n | QEMU downtime ms | pings lost in a row (10 ms) | "
             "longest reply gap ms | migration ms | echo kept |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for dirty in args.dirty:
        for mode in ("managed", "p2p"):
            group = [s for s in samples if s.dirty_mib == dirty and s.mode == mode]
            if not group:
                continue

            def cell(values: list[float], fmt: str = "{:.0f}") -> str:
                return f"{fmt.format(statistics.median(values))} ({fmt.format(max(values))})"

            lines.append(
                f"| {dirty} | {mode} | {len(group)} | "
                f"{cell([s.qemu_downtime_ms for s in group])} | "
                f"{cell([float(s.ping_lost_in_row) for s in group])} | "
                f"{cell([s.ping_gap_ms for s in group])} | "
                f"{cell([s.total_ms for s in group])} | "
                f"{'yes' if all(s.echo_ok for s in group) else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.linuxguest", description=__doc__)
    p.add_argument("--runs", type=int, default=4, help="migrations per mode and dirty size")
    p.add_argument("--dirty", type=lambda t: [int(x) for x in t.split(",")], default=[0, 64],
                   help="MiB the writer rewrites, comma-separated (0: idle)")
    p.add_argument("--memory", type=int, default=256, help="guest MiB")
    args = p.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    root = Path(tempfile.mkdtemp(prefix="ferry-blg-", dir="/tmp"))
    fleet = Fleet(root=root, log_level="INFO")
    samples: list[Sample] = []
    try:
        fleet.start(list(HOSTS))
        lan = GuestLan(fleet).start()
        try:
            client = Client(load({"FERRY_BROKER_URL": fleet.broker_url}))
            for dirty in args.dirty:
                samples += run_dirty(client, lan, root, dirty, args.runs, args.memory)
        finally:
            lan.stop()
    finally:
        fleet.stop()
        shutil.rmtree(root, ignore_errors=True)
    text = markdown(samples, args, started)
    OUT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
