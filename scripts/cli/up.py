"""`ferry up`: a local ferry in the foreground, stopped with Ctrl-C.

With no FERRY_BROKER_URL it runs its own redis-server on 127.0.0.1:6379
(ferry's default broker URL), so `ferry` in another terminal needs no
settings.  With --sentinel it runs a Redis master, a replica and three
sentinels on free loopback ports instead (scripts/testbed/sentinel.py).
Guests outlive the hosts, as with any worker stop.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from config.settings import load
from scripts.testbed.stack import Stack, free_port

DEFAULT_PORT = 6379


def state_root() -> Path:
    return Path(os.environ.get("FERRY_STATE_DIR", "state")).resolve()


def start_stack(args: argparse.Namespace, root: Path, log_level: str = "INFO",
                redis_port: int | None = None) -> Stack:
    """Redis (unless FERRY_BROKER_URL is set) on `redis_port` (default: 6379 if free) and hosts."""
    stack = Stack(root=root, log_level=log_level)
    url = os.environ.get("FERRY_BROKER_URL")
    if getattr(args, "sentinel", False):
        stack.start_sentinel()
        assert stack.sentinel is not None
        print(f"redis master, replica and 3 sentinels (master name "
              f"'{stack.sentinel.master_name}') in {stack.sentinel.root}")
    elif url:
        stack.broker_url = url
    else:
        port = redis_port or (DEFAULT_PORT if _port_free(DEFAULT_PORT) else free_port())
        stack.start_redis(port)
        print(f"redis-server on {stack.broker_url}")
    for name in [h.strip() for h in args.hosts.split(",") if h.strip()]:
        stack.start_worker(name, uuid=_stored_uuid(root / name))
        print(f"host {name} up (state in {root / name})")
    return stack


def _stored_uuid(state_dir: Path) -> str | None:
    path = state_dir / "host-uuid"
    return path.read_text().strip() if path.exists() else None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_flower(stack: Stack) -> subprocess.Popen[bytes]:
    celery = Path(sys.executable).with_name("celery")
    # Flower 2 answers its HTTP API only with this set; it listens on loopback only.
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "1"}
    return subprocess.Popen([str(celery), "--broker", stack.broker_url, "flower",
                             "--address=127.0.0.1", "--port=5555"], stdin=subprocess.DEVNULL,
                            env=env)


def run_up(args: argparse.Namespace) -> int:
    stack = start_stack(args, state_root())
    flower = start_flower(stack) if args.flower else None
    if flower:
        print("flower on http://127.0.0.1:5555")
    if stack.broker_url != load({}).broker_url:
        print(f"in another terminal: export FERRY_BROKER_URL={shlex.quote(stack.broker_url)}")
    print("ready; Ctrl-C stops the hosts (guests keep running)")
    stopped = threading.Event()
    # Both set explicitly: a shell starts background jobs with SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    try:
        while not stopped.wait(1.0):
            pass
    finally:
        if flower:
            flower.terminate()
            flower.wait(timeout=10)
        stack.stop(kill_guests=False)
        print("stopped")
    return 0
