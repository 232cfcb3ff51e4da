"""Start and stop a local ferry: one redis-server and a worker per host.

Used by `ferry up`, `ferry demo` and the test fixtures, so all three run
the same real processes.  Everything is tracked by pid and stopped by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from config import broker
from config.settings import Settings, load
from scripts.testbed.sentinel import SentinelSet
from workers import confine
from workers.heartbeat import get_host


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], object], timeout: float, what: str,
             interval: float = 0.05) -> object:
    """Poll `pred` until it returns a true value or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; returns once the pid is gone or a zombie."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: not pid_alive(pid), timeout, f"pid {pid} to exit")
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 10, f"pid {pid} to die")


def searchable(path: Path) -> Path:
    """`path` and every directory above it searchable by all users (o+x, not listable),
    so that a confined QEMU (FERRY_QEMU_USER) reaches the images in it, as libvirt
    needs of an image's directories; temp dirs are made 0700."""
    for d in (path, *path.parents):
        st = d.stat()
        if not st.st_mode & 0o001:
            d.chmod(stat.S_IMODE(st.st_mode) | 0o001)
    return path


def qemu_writable(path: Path, settings: Settings) -> Path:
    """A new directory `path` (in a searchable parent) that the QEMU user of `settings`
    owns: what QMP commands that write a file by name (pmemsave, screendump) need when
    QEMU is confined."""
    path.mkdir(mode=0o700)
    searchable(path.parent)
    conf = confine.resolve(settings.qemu_user, settings.qemu_group)
    if conf is not None:
        os.chown(path, conf.uid, conf.gid)
    return path


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass(frozen=True)
class RedisTls:
    """Certificate, key and CA of a redis-server that speaks only TLS."""

    cert: Path
    key: Path
    ca: Path
    auth_clients: bool = False  # clients must show a certificate the CA signed


@dataclass
class Worker:
    name: str
    uuid: str
    state_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # its own, on top of the stack's


_STARTED: list[Stack] = []


def started_stacks() -> list[Stack]:
    """Every stack of this process that has started its redis-server, running or stopped
    since (the test bed's leftover check, scripts/testbed/leftovers.py, looks at all)."""
    return list(_STARTED)


@dataclass
class Stack:
    root: Path
    broker_url: str = ""
    log_level: str = "INFO"
    redis_proc: subprocess.Popen[bytes] | None = None
    redis_port: int = 0
    redis_password: str | None = None
    redis_persistent: bool = False
    workers: dict[str, Worker] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    sentinel: SentinelSet | None = None  # start_sentinel(): the broker is a Sentinel set

    def start_sentinel(self, **options: Any) -> str:
        """A master, one replica and three sentinels instead of one redis-server
        (scripts/testbed/sentinel.py); the broker URL in Sentinel form."""
        self.sentinel = SentinelSet(self.root / "sentinel", **options)
        self.broker_url = self.sentinel.start()
        self.extra_env.update({k: v for k, v in self.sentinel.env().items()
                               if k != "FERRY_BROKER_URL"})
        return self.broker_url

    def start_redis(self, port: int | None = None, password: str | None = None,
                    bind: str = "127.0.0.1", tls: RedisTls | None = None,
                    persistent: bool = False) -> str:
        """redis-server on `bind`; with `tls`, on a TLS port only (rediss://);
        `persistent` keeps its data (append-only file) across restart_redis(), as a
        production broker would."""
        if not any(st is self for st in _STARTED):
            _STARTED.append(self)
        port = port or free_port()
        rdir = self.root / "redis"
        rdir.mkdir(parents=True, exist_ok=True)
        self.redis_port, self.redis_password = port, password
        self.redis_persistent = persistent
        listen = ["--port", str(port)] if tls is None else [
            "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.cert),
            "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca),
            "--tls-auth-clients", "yes" if tls.auth_clients else "no"]
        self.redis_proc = subprocess.Popen(
            ["redis-server", *listen, "--bind", bind, "--dir", str(rdir),
             "--save", "", "--appendonly", "yes" if persistent else "no",
             "--appendfsync", "always", "--daemonize", "no",
             *(["--requirepass", password] if password else [])],
            stdout=open(rdir / "redis.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            stdin=subprocess.DEVNULL)
        auth = f":{password}@" if password else ""
        scheme = "redis" if tls is None else "rediss"
        self.broker_url = f"{scheme}://{auth}{bind}:{port}/0"
        if tls is not None:
            self.extra_env["FERRY_REDIS_CA"] = str(tls.ca)
        client = self.redis_client(socket_timeout=1)
        wait_for(lambda: _ping(client), 10, "redis-server to answer")
        return self.broker_url

    def settings(self) -> Settings:
        return load(self.env())

    def redis_client(self, **kwargs: Any) -> redis.Redis:
        """A client of this stack's Redis, TLS included (config/broker.py)."""
        return broker.connect(self.settings(), **kwargs)

    def stop_redis(self) -> None:
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            try:
                self.redis_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis_proc.kill()
                self.redis_proc.wait(timeout=5)

    def restart_redis(self) -> None:
        """Stop redis-server and start it again on the same port (its data kept if it
        was started persistent; plain TCP only)."""
        self.stop_redis()
        self.start_redis(self.redis_port, self.redis_password,
                         persistent=self.redis_persistent)

    def env(self, name: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["FERRY_BROKER_URL"] = self.broker_url
        env["FERRY_LOG_LEVEL"] = self.log_level
        if name is not None:
            env["FERRY_HOST"] = name
        return env

    def start_worker(self, name: str, uuid: str | None = None, wait: bool = True,
                     env: dict[str, str] | None = None,
                     prefix: tuple[str, ...] = ()) -> Worker:
        """Start `ferry worker` for host `name`; `prefix` wraps the command (e.g. `ip
        netns exec NS`, which execs it: the pid stays the worker's)."""
        w = self.workers.get(name) or Worker(name, uuid or str(uuidlib.uuid4()),
                                             self.root / name)
        w.state_dir.mkdir(parents=True, exist_ok=True)
        w.env = dict(env or {})
        ferry = Path(sys.executable).with_name("ferry")
        w.proc = subprocess.Popen(
            [*prefix, str(ferry), "worker", "--host", name, "--uuid", w.uuid,
             "--state-dir", str(w.state_dir)],
            env={**self.env(name), **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=open(w.state_dir / "stdout.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True)
        self.workers[name] = w
        if wait:
            self.wait_alive(name, w.proc.pid)
        return w

    def wait_alive(self, name: str, pid: int, timeout: float = 30) -> None:
        client = self.redis_client(socket_timeout=2)

        def ready() -> bool:
            proc = self.workers[name].proc
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"worker {name} exited with {proc.returncode}; see "
                                   f"{self.workers[name].state_dir}/stdout.log")
            rec = get_host(client, name)
            return rec is not None and rec.get("pid") == pid

        wait_for(ready, timeout, f"host {name} to come up")

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.workers[name].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    def stop_worker(self, name: str) -> None:
        proc = self.workers[name].proc
        if proc is not None and proc.poll() is None:
            stop_pid(proc.pid, timeout=20)
            proc.wait(timeout=5)

    def remove_worker(self, name: str, kill_guests: bool = True) -> None:
        """Stop a worker and (by pid, from its pidfiles) the guests it left."""
        self.stop_worker(name)
        w = self.workers.pop(name)
        if kill_guests:
            for pid in _pidfile_pids(w.state_dir):
                stop_pid(pid, timeout=5)

    def guest_pids(self) -> list[int]:
        return [p for w in self.workers.values() for p in _pidfile_pids(w.state_dir)]

    def stop(self, kill_guests: bool = True) -> None:
        for name in list(self.workers):
            self.stop_worker(name)
        if kill_guests:
            for pid in self.guest_pids():
                stop_pid(pid, timeout=5)
        self.stop_redis()
        if self.sentinel is not None:
            self.sentinel.stop()


def _pidfile_pids(state_dir: Path) -> list[int]:
    pids = []
    for pidfile in (state_dir / "run").glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pids.append(int(pidfile.read_text().strip()))
    return [p for p in pids if pid_alive(p)]


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
