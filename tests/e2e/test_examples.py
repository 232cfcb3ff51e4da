"""The send_task example runs in its own process, without ferry, and moves a guest."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from scripts.testbed.stack import Stack
from tasks.client import Client
from tests.conftest import Guest

EXAMPLE = Path(__file__).parents[2] / "scripts" / "examples" / "send_task_migrate.py"
FERRY_PACKAGES = {"config", "tasks", "workers", "scripts"}


def _run_example(stack: Stack, *args: str) -> tuple[int, str, set[str]]:
    """Its exit status, its stdout, and every top-level module it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", str(EXAMPLE), *args],
                          env=stack.env(), capture_output=True, text=True, timeout=120,
                          cwd="/", stdin=subprocess.DEVNULL)
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0]
                for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc.returncode, proc.stdout, imported


def test_a_service_without_ferry_migrates_a_guest_by_task_names(
        stack: Stack, client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(domain_type="qemu")
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    first = guest.wait_tick()

    rc, out, imported = _run_example(stack, guest.name, "alpha", "beta", "--bandwidth", "500")

    assert rc == 0, out
    summary = json.loads(out)
    assert (summary["result"], summary["domain"], summary["source"], summary["dest"]) == \
        ("completed", guest.name, "alpha", "beta")
    assert [p["phase"] for p in summary["phases"]] == \
        ["begin3", "prepare", "perform3", "finish3", "confirm3"]
    assert "celery" in imported and not imported & FERRY_PACKAGES
    info = client.call("beta", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("running", "migrated")
    assert client.call("alpha", "dominfo", domain=guest.name)["state"] == "shutoff"
    guest.wait_kept_running(first, more=3)


def test_the_example_prints_the_first_error_as_json_when_the_migration_fails(
        stack: Stack) -> None:
    rc, out, _ = _run_example(stack, "no-such-guest", "alpha", "beta", "--wait", "60")

    assert rc == 1
    failed = json.loads(out)
    assert failed["result"] == "failed"
    err = failed["error"]
    assert (err["phase"], err["host"]) == ("begin3", "alpha")
    assert "no-such-guest" in err["message"] and err["type"].endswith("Error")
