"""A Redis Sentinel set on loopback: a master, one replica and three sentinels.

Used by `ferry up --sentinel`, the test stack and the Sentinel benchmark, so
anyone can watch a failover on one machine.  Every process runs on a free
loopback port with its files in a directory of its own under `root`, is
tracked by pid and stopped by pid.  `kill_master()` SIGKILLs the master's
process (what the loss of its machine looks like to everyone else);
`restart_as_replica()` brings that server back as a replica of the new master,
as an operator would once the machine is back.

The sentinels decide fast (down-after-milliseconds 2000 by default, where
production uses 5-30 s), so a test sees a failover in about three seconds.  At
1000 a loaded 2-CPU machine made them fail over a second time now and then (a
sentinel's fresh link to the new master unanswered for a second), which loses
what the demoted master took (a Celery publish, a plain write) as any Redis
failover does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis

T = TypeVar("T")
HOST = "127.0.0.1"
QUORUM = 2
SENTINELS = 3


def free_port() -> int:
    """A TCP port on loopback nobody listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def poll(pred: Callable[[], T | None], timeout: float, what: str,
         interval: float = 0.05) -> T:
    """`pred()` once it is true, polled every `interval`; TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass
class Server:
    """One redis-server or redis-sentinel process of the set."""

    name: str
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass
class SentinelSet:
    root: Path
    master_name: str = "ferry"
    password: str | None = None  # the servers' requirepass (the URL's password)
    sentinel_password: str | None = None  # the sentinels' own
    down_after_ms: int = 2000
    failover_timeout_ms: int = 2000
    # TLS only (servers, replication and sentinels): certificate, key, CA; the
    # certificate must name 127.0.0.1 (the sentinels hand out addresses)
    tls: tuple[Path, Path, Path] | None = None
    servers: list[Server] = field(default_factory=list)
    sentinels: list[Server] = field(default_factory=list)

    # -- start and stop ------------------------------------------------------------------
    def start(self) -> str:
        """Master, replica, three sentinels; returns the broker URL (Sentinel form)."""
        self.root.mkdir(parents=True, exist_ok=True)
        master = self._server("redis-a")
        self._start_server(master, replica_of=None)
        replica = self._server("redis-b")
        self._start_server(replica, replica_of=master)
        self.wait_replicas(1)
        for index in range(SENTINELS):
            self._start_sentinel(index, master)
        self.wait_sentinels_ready()
        return self.url

    def stop(self) -> None:
        for proc in [*self.sentinels, *self.servers]:
            proc.stop()

    def _server(self, name: str) -> Server:
        server = Server(name, free_port(), self.root / name)
        server.dir.mkdir(parents=True, exist_ok=True)
        self.servers.append(server)
        return server

    def _start_server(self, server: Server, replica_of: Server | None) -> None:
        auth = ["--requirepass", self.password, "--masterauth", self.password] \
            if self.password else []
        follow = ["--replicaof", HOST, str(replica_of.port)] if replica_of else []
        listen = ["--port", str(server.port)]
        if self.tls is not None:
            cert, key, ca = self.tls
            listen = ["--port", "0", "--tls-port", str(server.port), "--tls-cert-file",
                      str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                      "--tls-auth-clients", "no", "--tls-replication", "yes"]
        server.proc = subprocess.Popen(
            ["redis-server", *listen, "--bind", HOST,
             "--dir", str(server.dir), "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--repl-diskless-sync", "yes",
             "--repl-diskless-sync-delay", "0", *auth, *follow],
            stdout=open(server.dir / "redis.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        client = self._client(server)
        poll(lambda: _ping(client), 10, f"{server.name} to answer")

    def _start_sentinel(self, index: int, master: Server) -> None:
        sentinel = Server(f"sentinel-{index}", free_port(), self.root / f"sentinel-{index}")
        sentinel.dir.mkdir(parents=True, exist_ok=True)
        name = self.master_name
        listen = [f"port {sentinel.port}"]
        if self.tls is not None:
            cert, key, ca = self.tls
            listen = ["port 0", f"tls-port {sentinel.port}", f"tls-cert-file {cert}",
                      f"tls-key-file {key}", f"tls-ca-cert-file {ca}", "tls-auth-clients no",
                      "tls-replication yes"]
        lines = [*listen, f"bind {HOST}", f"dir {sentinel.dir}",
                 "daemonize no", f"logfile {sentinel.dir / 'sentinel.log'}",
                 f"sentinel monitor {name} {HOST} {master.port} {QUORUM}",
                 f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                 f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                 f"sentinel parallel-syncs {name} 1"]
        if self.password:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        if self.sentinel_password:
            lines.append(f"requirepass {self.sentinel_password}")
        config = sentinel.dir / "sentinel.conf"  # the sentinel rewrites it as it learns
        config.write_text("\n".join(lines) + "\n")
        sentinel.proc = subprocess.Popen(
            ["redis-sentinel", str(config)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(sentinel.dir / "stderr.log", "ab"))  # noqa: SIM115
        self.sentinels.append(sentinel)
        client = self._sentinel_client(sentinel)
        poll(lambda: _ping(client), 10, f"{sentinel.name} to answer")

    # -- what the set looks like ---------------------------------------------------------
    @property
    def url(self) -> str:
        """Celery's Sentinel form: one sentinel:// part per sentinel."""
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth}{HOST}:{s.port}/0" for s in self.sentinels)

    def env(self) -> dict[str, str]:
        """The settings a ferry process needs for this set."""
        env = {"FERRY_BROKER_URL": self.url, "FERRY_SENTINEL_MASTER": self.master_name}
        if self.sentinel_password:
            env["FERRY_SENTINEL_PASSWORD"] = self.sentinel_password
        if self.tls is not None:
            env["FERRY_REDIS_CA"] = str(self.tls[2])
        return env

    def _tls_kwargs(self) -> dict[str, Any]:
        if self.tls is None:
            return {}
        return {"ssl": True, "ssl_ca_certs": str(self.tls[2])}

    def _client(self, server: Server, timeout: float = 1.0) -> redis.Redis:
        return redis.Redis(HOST, server.port, password=self.password, socket_timeout=timeout,
                           socket_connect_timeout=timeout, **self._tls_kwargs())

    def _sentinel_client(self, sentinel: Server) -> redis.Redis:
        return redis.Redis(HOST, sentinel.port, password=self.sentinel_password,
                           socket_timeout=1.0, socket_connect_timeout=1.0,
                           **self._tls_kwargs())

    def server_at(self, port: int) -> Server:
        for server in self.servers:
            if server.port == port:
                return server
        raise LookupError(f"no server of the set on port {port}")

    def master_port_by(self, sentinel: Server) -> int | None:
        """The master's port as `sentinel` tells it (None: it does not answer)."""
        try:
            addr: object = self._sentinel_client(sentinel).sentinel_get_master_addr_by_name(
                self.master_name)
        except redis.RedisError:
            return None
        return int(addr[1]) if isinstance(addr, list | tuple) and len(addr) == 2 else None

    def master(self) -> Server:
        """The server the running sentinels agree is the master."""
        ports = {p for s in self.sentinels if s.running()
                 if (p := self.master_port_by(s)) is not None}
        if len(ports) != 1:
            raise LookupError(f"the sentinels do not agree on a master: {sorted(ports)}")
        return self.server_at(ports.pop())

    def role(self, server: Server) -> tuple[str, int]:
        """(role, connected replicas) of a running server."""
        info = self._client(server).info("replication")
        return str(info["role"]), int(info.get("connected_slaves", 0))

    def replicas_of(self, master: Server) -> int:
        """Replicas whose link to `master` is up and in sync (by the master's INFO)."""
        try:
            info = self._client(master).info("replication")
        except redis.RedisError:
            return 0
        count = 0
        for key, value in info.items():
            if key.startswith("slave") and isinstance(value, dict) and \
                    value.get("state") == "online":
                count += 1
        return count

    def wait_replicas(self, count: int, timeout: float = 20) -> None:
        """Until the current master has `count` replicas online (the sentinels' master
        once they run, else the first server)."""
        def ready() -> bool:
            try:
                master = self.master() if self.sentinels else self.servers[0]
            except LookupError:
                return False
            return self.replicas_of(master) >= count

        poll(ready, timeout, f"{count} replica(s) online")

    def wait_sentinels_ready(self, timeout: float = 30) -> None:
        """Until every sentinel knows the master, the replica and the other sentinels
        (only then can they agree on a failover)."""
        def ready(sentinel: Server) -> bool:
            try:
                state = self._sentinel_client(sentinel).sentinel_master(self.master_name)
            except redis.RedisError:
                return False
            if not isinstance(state, dict):
                return False
            return int(state.get("num-other-sentinels", 0)) >= SENTINELS - 1 and \
                int(state.get("num-slaves", 0)) >= 1 and "s_down" not in state.get("flags", "")

        for sentinel in self.sentinels:
            poll(lambda s=sentinel: ready(s), timeout, f"{sentinel.name} to know the set")  # type: ignore[misc]

    # -- faults --------------------------------------------------------------------------
    def kill_master(self) -> Server:
        """SIGKILL the master's process, as if its machine were gone; returns it."""
        master = self.master()
        assert master.proc is not None
        os.kill(master.proc.pid, signal.SIGKILL)
        master.proc.wait(timeout=10)
        return master

    def cut_replica_link(self, for_s: float | None = None) -> None:
        """Leave the replicas behind: they are stopped (SIGSTOP) and the master drops
        their links, so what the master takes from now on reaches no replica until
        `resume_replicas()` (at once, or after `for_s` seconds in a timer thread):
        then they reconnect and catch up, unless the master is gone by then."""
        master = self.master()
        replicas = [s for s in self.servers if s is not master and s.running()]
        for replica in replicas:
            os.kill(replica.pid, signal.SIGSTOP)
        self._client(master).client_kill_filter(_type="replica")
        if for_s is not None:
            timer = threading.Timer(for_s, self.resume_replicas)
            timer.daemon = True
            timer.start()

    def resume_replicas(self) -> None:
        """SIGCONT every replica `cut_replica_link` stopped."""
        for server in self.servers:
            if server.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.pid, signal.SIGCONT)

    def wait_failover(self, old: Server, timeout: float = 30) -> Server:
        """Until every running sentinel names a new master that says it is one."""
        def promoted() -> Server | None:
            try:
                master = self.master()
            except LookupError:
                return None
            if master is old or not master.running():
                return None
            try:
                return master if self.role(master)[0] == "master" else None
            except redis.RedisError:
                return None

        return poll(promoted, timeout, "the sentinels to promote the replica")

    def restart_as_replica(self, server: Server) -> None:
        """Start a killed server again, as a replica of the current master (its data
        comes from the master by a full sync)."""
        assert not server.running(), f"{server.name} still runs"
        self._start_server(server, replica_of=self.master())

    def heal(self, old: Server, timeout: float = 30) -> Server:
        """After kill_master(): wait for the failover, bring the old master back as a
        replica and wait until it is in sync; returns the new master."""
        new = self.wait_failover(old, timeout)
        self.restart_as_replica(old)
        self.wait_replicas(1, timeout)
        return new

    def pids(self) -> list[int]:
        return [s.pid for s in [*self.servers, *self.sentinels] if s.running()]


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    return _alive(pid)
