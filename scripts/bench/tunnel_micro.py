"""`python -m scripts.bench.tunnel_micro`: the tunnel's own throughput, without QEMU.

socketpair -> TunnelSender -> redis-server -> TunnelReceiver -> socketpair, the
receiver in a child process as on a real dest worker (its own GIL), a writer
thread standing in for the source QEMU and a reader for the dest QEMU.  Prints
MiB/s and the CPU seconds of the sender process, the receiver process and
redis-server per run, so tunnel changes can be compared without QEMU's noise.
Runs alternate with a plain socketpair copy of the same bytes (the ceiling).
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing as mp
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.utils import HIREDIS_AVAILABLE

from config.settings import load
from scripts.testbed.stack import Stack, searchable, stop_pid
from workers.migration import tunnel

BLOCK = 1 << 20


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drain(sock: socket.socket) -> int:
    buf = bytearray(BLOCK)
    got = 0
    while True:
        n = sock.recv_into(buf)
        if n == 0:
            return got
        got += n


def _receiver(url: str, job: str, sock: socket.socket, conn: Any) -> None:
    pump = tunnel.TunnelReceiver(load({"FERRY_BROKER_URL": url}), job, sock)
    cpu0 = _cpu_s()
    pump.start()
    conn.send("ready")
    pump.join()
    pump.finish(10)
    conn.send((_cpu_s() - cpu0, pump.error))


def _drainer(sock: socket.socket, conn: Any) -> None:
    conn.send(_drain(sock))


def _write(sock: socket.socket, total: int) -> None:
    block = os.urandom(BLOCK)
    left = total
    while left > 0:
        n = min(left, BLOCK)
        sock.sendall(block[:n])
        left -= n
    sock.shutdown(socket.SHUT_WR)


def _fork(target: Any, *args: Any) -> Any:
    proc = mp.get_context("fork").Process(target=target, args=args)
    proc.start()
    return proc


def run_tunnel(url: str, total: int, window: int, chunk: int, i: int) -> dict[str, float]:
    """One stream; the writer (QEMU source), receiver and drainer (QEMU dest) are children."""
    job = f"micro-{os.getpid()}-{i}"
    pair = getattr(tunnel, "stream_pair", socket.socketpair)
    src_qemu, src_ours = pair()
    dst_qemu, dst_ours = pair()
    recv_conn, recv_child = mp.Pipe()
    drain_conn, drain_child = mp.Pipe()
    procs = [_fork(_receiver, url, job, dst_ours, recv_child),
             _fork(_drainer, dst_qemu, drain_child)]
    dst_qemu.close()
    dst_ours.close()
    assert recv_conn.recv() == "ready"
    sender = tunnel.TunnelSender(load({"FERRY_BROKER_URL": url}), job, src_ours,
                                 window=window, chunk=chunk)
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    procs.append(_fork(_write, src_qemu, total))
    src_qemu.close()
    sender.start()
    got = drain_conn.recv()
    wall = time.perf_counter() - t0
    recv_cpu, error = recv_conn.recv()
    sender.finish(10)
    for proc in procs:
        proc.join(10)
    if got != total or error or sender.error:
        raise RuntimeError(f"tunnel moved {got} of {total} bytes: {error or sender.error}")
    return {"mib_s": total / wall / BLOCK, "wall_s": wall, "send_cpu_s": _cpu_s() - cpu0,
            "recv_cpu_s": recv_cpu}


def run_direct(total: int) -> dict[str, float]:
    a, b = socket.socketpair()
    t0 = time.perf_counter()
    writer = _fork(_write, a, total)
    a.close()
    got = _drain(b)
    wall = time.perf_counter() - t0
    writer.join(10)
    b.close()
    assert got == total
    return {"mib_s": total / wall / BLOCK, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.tunnel_micro", description=__doc__)
    p.add_argument("--mib", type=int, default=512, help="bytes per run, MiB (default 512)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--window-mib", type=int, default=4)
    p.add_argument("--chunk-kib", type=int, default=1024)
    p.add_argument("--module", default=None,
                   help="import the tunnel from this module instead (A/B against an old copy)")
    args = p.parse_args(argv)
    if args.module:
        global tunnel
        tunnel = importlib.import_module(args.module)
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-micro-", dir="/tmp")))
    stack = Stack(root=root)
    total = args.mib << 20
    rows: list[dict[str, float]] = []
    direct: list[float] = []
    try:
        url = stack.start_redis()
        assert stack.redis_proc is not None
        rpid = stack.redis_proc.pid
        for i in range(args.runs):
            direct.append(run_direct(total)["mib_s"])
            r0 = _proc_cpu_s(rpid)
            row = run_tunnel(url, total, args.window_mib << 20, args.chunk_kib << 10, i)
            row["redis_cpu_s"] = _proc_cpu_s(rpid) - r0
            rows.append(row)
            print(f"run {i + 1}: tunnel {row['mib_s']:.0f} MiB/s, direct {direct[-1]:.0f} "
                  f"MiB/s; cpu s: sender {row['send_cpu_s']:.2f} receiver "
                  f"{row['recv_cpu_s']:.2f} redis {row['redis_cpu_s']:.2f}",
                  file=sys.stderr, flush=True)
    finally:
        if stack.redis_proc is not None:
            stop_pid(stack.redis_proc.pid)
            stack.redis_proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    parser = "hiredis" if HIREDIS_AVAILABLE else "pure Python"
    print(f"window {args.window_mib} MiB, chunk {args.chunk_kib} KiB, {args.mib} MiB x "
          f"{args.runs}, parser {parser}: tunnel median {med['mib_s']:.0f} MiB/s "
          f"(direct socketpair {statistics.median(direct):.0f}); CPU s per GiB: sender "
          f"{med['send_cpu_s'] * 1024 / args.mib:.2f}, receiver "
          f"{med['recv_cpu_s'] * 1024 / args.mib:.2f}, redis "
          f"{med['redis_cpu_s'] * 1024 / args.mib:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
