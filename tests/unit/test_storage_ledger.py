"""The dest's ledger of images its Prepare created: removed on failure, kept on success,
swept when a job ended without its Finish, never taken from a message."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from workers.migration.storage_dest import Ledger, sweep_images


def agent_at(root: Path) -> Any:
    return SimpleNamespace(store=SimpleNamespace(root=root))


def test_a_failed_job_removes_exactly_the_images_it_created(tmp_path: Path) -> None:
    made, other = tmp_path / "made.qcow2", tmp_path / "was-there.qcow2"
    made.write_text("x")
    other.write_text("y")
    ledger = Ledger(tmp_path)
    ledger.add("job-1", "g", str(made))
    assert ledger.discard("job-1") == [str(made)]
    assert not made.exists() and other.exists()
    assert ledger.get("job-1") is None and ledger.discard("job-1") == []


def test_a_completed_job_keeps_its_images_and_forgets_them(tmp_path: Path) -> None:
    made = tmp_path / "made.raw"
    made.write_text("x")
    ledger = Ledger(tmp_path)
    ledger.add("job-2", "g", str(made))
    ledger.forget("job-2")
    assert made.exists() and ledger.entries() == []


def test_job_ids_never_become_paths(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.add("../../etc/passwd", "g", "/nowhere")
    [entry] = ledger.entries()
    assert entry["job"] == "../../etc/passwd"
    assert [p.parent for p in (tmp_path / "storage").iterdir()] == [tmp_path / "storage"]


def test_the_sweeper_removes_images_of_ended_jobs_unless_the_guest_arrived(
        tmp_path: Path) -> None:
    lost, arrived, running_job = (tmp_path / n for n in ("lost.img", "arrived.img", "r.img"))
    for path in (lost, arrived, running_job):
        path.write_text("x")
    ledger = Ledger(tmp_path)
    ledger.add("ended-lost", "g1", str(lost))
    ledger.add("ended-arrived", "g2", str(arrived))
    ledger.add("still-running", "g3", str(running_job))
    done = sweep_images(agent_at(tmp_path), ended=lambda job: job.startswith("ended"),
                        running=lambda name: name == "g2")
    assert done == [f"removed image(s) {lost} of incoming job ended-lost"]
    assert not lost.exists() and arrived.exists() and running_job.exists()
    assert [e["job"] for e in ledger.entries()] == ["still-running"]
