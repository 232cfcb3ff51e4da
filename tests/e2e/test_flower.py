"""Flower on the test broker sees every phase of a managed migration, on its host's queue."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.testbed.flowerctl import start_flower
from scripts.testbed.stack import Stack, wait_for
from tasks.client import Client
from tests.conftest import Guest

PHASES = {"begin3": "alpha", "prepare3": "beta", "perform3": "alpha", "finish3": "beta",
          "confirm3": "alpha"}


def test_flower_lists_all_five_phases_of_a_migration_with_their_queues_and_states(
        stack: Stack, client: Client, make_guest: Callable[..., Guest],
        tmp_path: Path) -> None:
    flower = start_flower(stack.broker_url, tmp_path / "flower.log", env=stack.env())
    try:
        flower.wait_ready(["alpha", "beta"])
        guest = make_guest(domain_type="qemu")
        client.call("alpha", "define", xml=guest.xml)
        client.call("alpha", "start", domain=guest.name)
        job = client.migrate(guest.name, "alpha", "beta", live=True)
        assert job.wait(timeout=60)["result"] == "completed"

        def all_done() -> dict[str, dict[str, Any]]:
            seen = flower.job_tasks(job.id)
            done = set(seen) == set(PHASES) and all(
                t["state"] == "SUCCESS" and t["routing_key"] for t in seen.values())
            return seen if done else {}

        tasks = wait_for(all_done, 20, f"flower to show the phases of job {job.id}")
        assert isinstance(tasks, dict)
        for phase, host in PHASES.items():
            task = tasks[phase]
            assert task["uuid"] == f"{job.id}.{phase}"
            assert task["name"] == f"ferry.{phase}"
            assert task["routing_key"] == f"host.{host}"
            assert task["worker"] == f"ferry@{host}"
            assert task["state"] == "SUCCESS"
            for shown in (f"'domain': '{guest.name}'", "'source': 'alpha'", "'dest': 'beta'"):
                assert shown in task["args"], (phase, task["args"])
        assert tasks["begin3"]["parent"] is None
        assert tasks["prepare3"]["parent"] == f"{job.id}.begin3"
        assert tasks["confirm3"]["root"] == f"{job.id}.begin3"
        assert "'result': 'completed'" in tasks["confirm3"]["result"]
    finally:
        flower.stop()
