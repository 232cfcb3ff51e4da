"""Run Flower on a ferry broker and read its HTTP API (the Flower test, the screenshot script).

Flower 2 refuses its `/api/...` endpoints without authentication unless
FLOWER_UNAUTHENTICATED_API is set; this Flower listens on loopback only, so
it sets it.  Flower learns about tasks from the workers' events, from the
moment it is connected: `wait_ready` waits until it has heard from every
host's worker before anything worth watching is started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.testbed.stack import free_port, stop_pid, wait_for


@dataclass
class Flower:
    url: str
    proc: subprocess.Popen[bytes]

    def get(self, path: str, timeout: float = 5) -> Any:
        """GET `path` (e.g. `/api/tasks`) and decode its JSON."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as reply:
            return json.loads(reply.read())

    def try_get(self, path: str) -> Any:
        """As `get`, but None while Flower does not answer yet."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"flower exited with status {self.proc.returncode}")
        try:
            return self.get(path)
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return None

    def wait_ready(self, hosts: list[str], timeout: float = 30) -> None:
        """Until Flower's event state has every host's worker (`ferry@NAME`) alive."""
        def ready() -> bool:
            seen = self.try_get("/api/workers?status=true") or {}
            return all(seen.get(f"ferry@{h}") for h in hosts)

        wait_for(ready, timeout, f"flower to hear from {', '.join(hosts)}", interval=0.2)

    def tasks(self) -> dict[str, dict[str, Any]]:
        """Every task Flower knows, by task id."""
        return dict(self.get("/api/tasks"))

    def job_tasks(self, job_id: str) -> dict[str, dict[str, Any]]:
        """The tasks of migration job `job_id` (task ids `<job id>.<phase>`), by phase."""
        prefix = f"{job_id}."
        return {tid.removeprefix(prefix): t for tid, t in self.tasks().items()
                if tid.startswith(prefix)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_pid(self.proc.pid, timeout=10)
        self.proc.wait(timeout=10)


def start_flower(broker_url: str, log: Path, port: int | None = None,
                 env: dict[str, str] | None = None) -> Flower:
    """Flower on 127.0.0.1:`port` (a free one by default), its output to `log`."""
    port = port or free_port()
    celery = Path(sys.executable).with_name("celery")
    run_env = {**(env if env is not None else os.environ), "FLOWER_UNAUTHENTICATED_API": "1"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(celery), "--broker", broker_url, "flower", "--address=127.0.0.1",
             f"--port={port}"],
            env=run_env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    return Flower(f"http://127.0.0.1:{port}", proc)
