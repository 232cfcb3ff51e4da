"""What a test left behind on the test bed's stacks, judged from outside ferry.

`snapshot(stacks)` reads, once each: /proc (the processes of the stacks: every
process whose command line names a stack's root, such as QEMU with its pidfile
and monitor socket in a host's state dir, and every child of a stack's workers,
such as a compressor; the workers and redis-server themselves excepted), the
listening TCP sockets in the stacks' migration port ranges (as each host's
network namespace sees them), the stacks' Redis keys that only a running job
may hold (job records, admission lines, waiting-migration and tunnel keys, and
leases of guests no QEMU runs), and the files in the hosts' state dirs that a domain
leaves while it exists (status files, pid files, monitor sockets, persistent
definitions; QEMU logs are kept on purpose).

`left_over(before, after)` names what `after` has that `before` had not;
`wait_left_over` polls until that is nothing or a deadline passes, for what
goes away on its own (a QEMU exiting after Confirm, a key deleted by the last
phase), and returns what is still there.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from config.settings import load
from scripts.testbed.stack import Stack, Worker

# Keys a job holds only while it runs (workers/jobs.py, workers/slots.py,
# workers/migration/tunnel.py); leases (workers/locks.py) are judged by their guest.
# Markers of an ended job (ferry:jobended:, ferry:queuedabort:) and completed records
# (ferry:jobdone:) outlive it on purpose, with a TTL: a late phase must still find them.
JOB_KEYS = ("ferry:job:", "ferry:queued:", "ferry:tunnel:")
SLOTS = "ferry:slots:"
LEASE = "ferry:lease:"
STATE_FILES = ("run", "qemu")  # under a host's state dir: status/pid/socket, definitions
KEPT_SUFFIXES = (".log",)  # QEMU's log stays after its guest, as libvirt's does


@dataclass(frozen=True)
class Snapshot:
    """Everything found, by identity (kind:where:what) -> what a report says."""

    things: dict[str, str] = field(default_factory=dict)


@dataclass
class _Proc:
    pid: int
    ppid: int
    start: str
    args: list[str]


def snapshot(stacks: Sequence[Stack]) -> Snapshot:
    """One look at every stack (running or stopped) of this process."""
    things: dict[str, str] = {}
    procs = _stack_processes(stacks)
    for p in procs:
        things[f"proc:{p.pid}:{p.start}"] = f"process {p.pid}: {' '.join(p.args)[:240]}"
    running = {p.args[i + 1] for p in procs for i, a in enumerate(p.args[:-1]) if a == "-uuid"}
    for st in stacks:
        if not _live_workers(st) and (st.redis_proc is None or st.redis_proc.poll() is not None):
            continue  # a stopped stack: only its processes (above) can still matter
        things.update(_ports(st, [p.pid for p in procs]))
        things.update(_keys(st, running))
        things.update(_files(st))
    return Snapshot(things)


def left_over(before: Snapshot, after: Snapshot) -> list[str]:
    """What `after` holds that `before` did not, one line each."""
    return [desc for key, desc in sorted(after.things.items()) if key not in before.things]


def wait_left_over(before: Snapshot, stacks: Sequence[Stack], timeout: float,
                   interval: float = 0.1) -> list[str]:
    """Look again until nothing new is left or `timeout` passes; what is left then."""
    deadline = time.monotonic() + timeout
    while True:
        found = left_over(before, snapshot(stacks))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(interval)


def _live_workers(st: Stack) -> list[Worker]:
    return [w for w in st.workers.values() if w.proc is not None and w.proc.poll() is None]


def _stack_processes(stacks: Sequence[Stack]) -> list[_Proc]:
    roots = [f"{st.root}/" for st in stacks]
    workers = {w.proc.pid for st in stacks for w in _live_workers(st) if w.proc is not None}
    own = workers | {st.redis_proc.pid for st in stacks if st.redis_proc is not None}
    found = []
    for proc in _all_processes():
        if proc.pid in own:
            continue
        if proc.ppid in workers or any(root in arg for arg in proc.args for root in roots) \
                or any(_cwd(proc.pid).startswith(root) for root in roots):
            found.append(proc)
    return found


def _cwd(pid: int) -> str:
    """Where a process runs: a worker starts QEMU in its run dir, and a confined QEMU's
    command line names no path of the stack (its files come as fds)."""
    try:
        return os.readlink(f"/proc/{pid}/cwd") + "/"
    except OSError:
        return ""


def _all_processes() -> Iterable[_Proc]:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:  # raw reads: this runs twice per test over every process of the machine
            stat = _read(f"/proc/{entry.name}/stat")
            raw = _read(f"/proc/{entry.name}/cmdline")
            fields = stat.rsplit(b")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if fields[0] == b"Z":  # a zombie runs nothing
            continue
        args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        yield _Proc(int(entry.name), int(fields[1]), fields[19].decode(), args)


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _port_range(st: Stack, w: Worker) -> tuple[int, int]:
    return _parsed_range({**st.extra_env, **w.env}.get("FERRY_MIGRATION_PORTS"))


@functools.lru_cache(maxsize=64)
def _parsed_range(spec: str | None) -> tuple[int, int]:
    """FERRY_MIGRATION_PORTS as the worker reads it (its default when unset)."""
    return load({} if spec is None else {"FERRY_MIGRATION_PORTS": spec}).migration_ports


def _netns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _ports(st: Stack, stack_pids: list[int]) -> dict[str, str]:
    """Listening sockets in the stack's migration ranges, in every network namespace a
    process of the stack lives in (fleet hosts have their own)."""
    ranges = {_port_range(st, w) for w in st.workers.values()}
    if not ranges:
        return {}
    own = _netns(os.getpid())
    spaces: dict[int, int] = {}  # namespace inode -> a pid inside it
    for pid in [w.proc.pid for w in _live_workers(st) if w.proc is not None] + stack_pids:
        ns = _netns(pid)
        if ns is not None:
            spaces.setdefault(ns, pid)
    if not spaces and own is not None:
        spaces[own] = os.getpid()
    found = {}
    for ns, pid in spaces.items():
        for port in _listening_here() if ns == own else _listening_in(pid):
            if any(lo <= port <= hi for lo, hi in ranges):
                found[f"port:{ns}:{port}"] = (f"port {port} listening (network namespace "
                                              f"{ns}; the stack's migration ports)")
    return found


def _listening_in(pid: int) -> set[int]:
    """Listening TCP ports in the network namespace of `pid`, from its /proc tables (a
    namespace of its own holds few sockets; the machine's table can hold thousands)."""
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if len(cols) > 3 and cols[3] == "0A":  # TCP_LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


_SOCK_DIAG_BY_FAMILY, _NLMSG_ERROR, _NLMSG_DONE = 20, 2, 3
_DUMP_REQUEST = 0x301  # NLM_F_REQUEST | NLM_F_DUMP
_TCP_LISTEN = 10


def _listening_here() -> set[int]:
    """Listening TCP ports in this process's network namespace, asked of the kernel
    (sock_diag: only LISTEN sockets come back, however many others there are)."""
    ports = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        # inet_diag_req_v2: family, protocol, ext, pad, states; then a zeroed sockid.
        req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN)
        req += bytes(48)
        msg = struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _DUMP_REQUEST, 1,
                          0) + req
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:  # SOCK_DIAG
            nl.sendto(msg, (0, 0))
            while True:
                data = nl.recv(1 << 16)
                at, done = 0, False
                while at + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, at)
                    if kind in (_NLMSG_DONE, _NLMSG_ERROR):
                        done = True
                        break
                    # inet_diag_msg: family, state, timer, retrans, then sport (big-endian)
                    ports.add(struct.unpack_from(">H", data, at + 16 + 4)[0])
                    at += (length + 3) & ~3
                if done or not data:
                    break
    return ports


_CLIENTS: dict[tuple[int, str], redis.Redis] = {}  # (stack, broker URL) -> a client


def _client(st: Stack) -> redis.Redis:
    key = (id(st), st.broker_url)
    if key not in _CLIENTS:
        _CLIENTS[key] = st.redis_client(socket_timeout=5)
    return _CLIENTS[key]


def _keys(st: Stack, running: set[str]) -> dict[str, str]:
    if st.redis_proc is None or st.redis_proc.poll() is not None:
        return {}
    found = {}
    client = _client(st)
    try:
        for raw in client.scan_iter(match="ferry:*", count=1000):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            where = f"redis:{st.root}:{key}"
            if key.startswith(JOB_KEYS):
                found[where] = f"Redis key {key}"
            elif key.startswith(SLOTS):
                for entry in client.lrange(key, 0, -1):
                    text = entry.decode() if isinstance(entry, bytes) else str(entry)
                    job = text.split("|", 1)[0]
                    found[f"{where}:{job}"] = f"Redis admission line {key} still holds {job}"
            elif key.startswith(LEASE):
                found.update(_orphan_lease(client, key, where, running))
    except redis.RedisError as exc:  # a test restarting redis: judged on the next look
        found[f"redis:{st.root}:unreadable"] = f"Redis of {st.root} unreadable: {exc}"
    return found


def _orphan_lease(client: redis.Redis, key: str, where: str,
                  running: set[str]) -> dict[str, str]:
    raw = client.get(key)
    if raw is None:
        return {}
    try:
        holder = json.loads(raw)
        uuid, host = str(holder["uuid"]), str(holder["host"])
    except (ValueError, KeyError, TypeError):
        return {where: f"Redis lease {key} unreadable: {raw!r}"}
    if uuid in running:
        return {}
    return {where: f"Redis lease {key} held by {host} for guest {uuid}, which no QEMU runs"}


def _files(st: Stack) -> dict[str, str]:
    found = {}
    with contextlib.suppress(OSError):
        for host in os.scandir(st.root):
            if not host.is_dir():
                continue
            for sub in STATE_FILES:
                with contextlib.suppress(OSError):
                    for entry in _entries(Path(host.path) / sub):
                        if not entry.name.endswith(KEPT_SUFFIXES):
                            found[f"file:{entry.path}"] = f"state file {entry.path}"
    return found


def _entries(path: Path) -> list[os.DirEntry[str]]:
    """The files under `path`, one level of directories down: a directory the host keeps
    for all its guests (channel sockets) is no leftover, what a guest left in it is."""
    out: list[os.DirEntry[str]] = []
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(OSError):
                out.extend(os.scandir(entry.path))
        else:
            out.append(entry)
    return out
