"""The staging scripts (evacuate, rolling, soak) on the test stack with small TCG guests."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scripts.staging import evacuate, rolling, soak
from scripts.testbed.stack import Stack
from tasks.client import Client
from tests.conftest import Guest


@pytest.fixture
def run(stack: Stack, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, Any]]:
    """Run a staging script's main(argv) in-process on the test broker; (rc, its JSON)."""
    monkeypatch.setenv("FERRY_BROKER_URL", stack.broker_url)

    def call(main: Callable[[list[str]], int], *argv: str) -> tuple[int, Any]:
        capsys.readouterr()
        rc = main(["--json", *argv])
        out = capsys.readouterr().out
        return rc, json.loads(out) if out.strip() else None

    return call


def _boot(client: Client, make_guest: Callable[..., Guest], host: str, n: int) -> list[Guest]:
    guests = [make_guest(domain_type="qemu") for _ in range(n)]
    for g in guests:
        client.call(host, "define", xml=g.xml)
        client.call(host, "start", domain=g.name)
    return guests


def _active(client: Client, host: str) -> set[str]:
    return {d["name"] for d in client.call(host, "list") if d["state"] == "running"}


@pytest.mark.parametrize("name", ["evacuate", "rolling", "soak"])
def test_each_staging_script_explains_itself_with_help(name: str, stack: Stack) -> None:
    proc = subprocess.run([sys.executable, "-m", f"scripts.staging.{name}", "--help"],
                          env=stack.env(), capture_output=True, text=True, timeout=30,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr
    assert f"python -m scripts.staging.{name}" in proc.stdout and "--json" in proc.stdout


def test_evacuate_moves_every_guest_off_the_host_and_reports_each(
        client: Client, make_guest: Callable[..., Guest],
        run: Callable[..., tuple[int, Any]]) -> None:
    guests = _boot(client, make_guest, "alpha", 3)
    guests[0].wait_tick()

    rc, rep = run(evacuate.main, "alpha", "--to", "beta", "--parallel", "2")

    assert rc == 0 and rep["source"] == "alpha" and (rep["ok"], rep["failed"]) == (3, 0)
    by_name = {m["domain"]: m for m in rep["moves"]}
    assert set(by_name) == {g.name for g in guests}
    for m in by_name.values():
        assert (m["dest"], m["ok"], m["error"]) == ("beta", True, None)
        assert m["seconds"] > 0 and m["downtime_ms"] is not None and m["job_id"]
    assert _active(client, "alpha") == set()
    assert {g.name for g in guests} <= _active(client, "beta")
    for g in guests:  # each the boot it started with, counting on by one
        g.wait_kept_running(more=3)


def test_evacuate_reports_a_guest_that_could_not_move_and_still_moves_the_others(
        client: Client, make_guest: Callable[..., Guest],
        faulty_host: Callable[[str], str], run: Callable[..., tuple[int, Any]]) -> None:
    bad = faulty_host("prepare3.qemu_argv=bad-arg")
    guests = _boot(client, make_guest, "alpha", 2)

    rc, rep = run(evacuate.main, "alpha", "--to", f"beta,{bad}", "--parallel", "2")

    assert rc == 1 and (rep["ok"], rep["failed"]) == (1, 1)
    moved = next(m for m in rep["moves"] if m["dest"] == "beta")
    failed = next(m for m in rep["moves"] if m["dest"] == bad)
    assert moved["ok"] and moved["error"] is None
    assert not failed["ok"] and "QEMU failed to start" in failed["error"]
    assert _active(client, "alpha") == {failed["domain"]}
    assert moved["domain"] in _active(client, "beta")
    assert {g.name for g in guests} == {moved["domain"], failed["domain"]}


def test_rolling_maintenance_empties_each_host_in_turn_and_runs_the_hook_between(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path,
        run: Callable[..., tuple[int, Any]]) -> None:
    on_alpha = _boot(client, make_guest, "alpha", 2)
    on_beta = _boot(client, make_guest, "beta", 1)
    log = tmp_path / "hook.log"
    hook = [sys.executable, "-c",
            "import os, sys; open(sys.argv[1], 'a').write("
            "sys.argv[2] + ' ' + os.environ['FERRY_MAINTENANCE_HOST'] + '\\n')",
            str(log), "{host}"]

    rc, rep = run(rolling.main, "alpha", "beta", "--parallel", "2", "--", *hook)

    assert rc == 0 and rep["ok"]
    assert log.read_text().splitlines() == ["alpha alpha", "beta beta"]
    alpha, beta = rep["hosts"]
    assert alpha["host"] == "alpha" and alpha["hook"]["rc"] == 0
    assert sorted(m["domain"] for m in alpha["moves"]) == sorted(g.name for g in on_alpha)
    assert sorted(m["domain"] for m in beta["moves"]) == \
        sorted(g.name for g in [*on_alpha, *on_beta])
    assert all(m["ok"] for h in rep["hosts"] for m in h["moves"])
    # Beta was emptied last, so every guest ends on alpha.
    assert {g.name for g in [*on_alpha, *on_beta]} <= _active(client, "alpha")
    assert _active(client, "beta") == set()
    for g in [*on_alpha, *on_beta]:
        g.wait_kept_running()


def test_soak_moves_the_guest_back_and_forth_and_reports_latency_percentiles(
        client: Client, make_guest: Callable[..., Guest],
        run: Callable[..., tuple[int, Any]]) -> None:
    (guest,) = _boot(client, make_guest, "alpha", 1)
    first = guest.wait_tick()

    rc, rep = run(soak.main, guest.name, "alpha", "beta", "--count", "4")

    assert rc == 0 and rep["completed"] and (rep["ok"], rep["failures"]) == (4, 0)
    assert [(m["source"], m["dest"]) for m in rep["moves"]] == \
        [("alpha", "beta"), ("beta", "alpha")] * 2
    lat = rep["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert rep["downtime_ms"]["max"] is not None and rep["failure"] is None
    assert guest.name in _active(client, "alpha")
    guest.wait_kept_running(first, more=3)


def test_soak_stops_at_the_first_failed_migration_and_reports_it(
        client: Client, make_guest: Callable[..., Guest],
        faulty_host: Callable[[str], str], run: Callable[..., tuple[int, Any]]) -> None:
    bad = faulty_host("perform3.before_migrate=raise")  # fails only as a source
    (guest,) = _boot(client, make_guest, "alpha", 1)

    rc, rep = run(soak.main, guest.name, "alpha", bad, "--count", "4")

    assert rc == 1 and not rep["completed"]
    assert (rep["done"], rep["ok"], rep["failures"]) == (2, 1, 1), rep["failure"]
    assert (rep["failure"]["source"], rep["failure"]["dest"]) == (bad, "alpha")
    assert "perform3.before_migrate" in rep["failure"]["error"]
    assert guest.name in _active(client, bad)
