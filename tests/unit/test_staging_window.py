"""The staging scripts' pure parts: the migration window, percentiles, the plain table."""

from __future__ import annotations

from typing import Any

import pytest

from scripts.staging import common
from scripts.staging.common import Move, migrate_window, percentile, table
from workers.errors import HostUnavailableError, MigrationError


class FakeJob:
    def __init__(self, client: FakeClient, domain: str, polls: int) -> None:
        self.client, self.domain, self.polls, self.id = client, domain, polls, f"job-{domain}"

    def done(self) -> bool:
        self.polls -= 1
        if self.polls <= 0:
            self.client.finished(self)
            return True
        return False

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        if self.domain.startswith("bad"):
            raise MigrationError("phase perform3 failed", "perform3", "alpha")
        return {"result": "completed", "statistics": {"downtime": 7}, "error": None}

    def abort(self) -> None:
        pass


class FakeClient:
    """Jobs finish after a number of polls that depends on the guest; counts what runs."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.peak = 0
        self.started: list[str] = []

    def migrate(self, domain: str, source: str, dest: str, **options: Any) -> FakeJob:
        if dest == "dead":
            raise HostUnavailableError("host 'dead' is not alive (no heartbeat in Redis)")
        self.started.append(domain)
        self.running.add(domain)
        self.peak = max(self.peak, len(self.running))
        return FakeJob(self, domain, polls=5 if domain.endswith("slow") else 1)

    def finished(self, job: FakeJob) -> None:
        self.running.discard(job.domain)


@pytest.fixture(autouse=True)
def no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "POLL_S", 0)


def test_the_window_never_runs_more_than_n_migrations_and_refills_as_they_end() -> None:
    client = FakeClient()
    moves = [Move(n, "alpha", "beta") for n in ("a-slow", "b", "c", "d", "e")]
    ended: list[str] = []

    done = migrate_window(client, moves, {}, parallel=2, wait=60,  # type: ignore[arg-type]
                          on_done=lambda m: ended.append(m.domain))

    assert client.peak == 2
    assert ended == ["b", "c", "d", "e", "a-slow"]  # the others pass the slow one
    assert [m.domain for m in done] == ["a-slow", "b", "c", "d", "e"]
    assert all(m.ok and m.downtime_ms == 7 and m.job_id for m in done)


def test_the_window_records_failures_and_goes_on_with_the_other_guests() -> None:
    client = FakeClient()
    moves = [Move("bad1", "alpha", "beta"), Move("x", "alpha", "dead"),
             Move("y", "alpha", "beta")]
    seen: list[str] = []

    done = migrate_window(client, moves, {}, parallel=1, wait=60,  # type: ignore[arg-type]
                          on_done=lambda m: seen.append(m.domain))

    assert [(m.domain, m.ok) for m in done] == [("bad1", False), ("x", False), ("y", True)]
    assert "perform3 failed" in (done[0].error or "")
    assert "not alive" in (done[1].error or "") and done[1].job_id is None
    assert sorted(seen) == ["bad1", "x", "y"]


def test_percentiles_use_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == \
        (50.0, 90.0, 99.0)
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None


def test_the_table_keeps_long_cells_whole_and_shows_none_as_a_dash() -> None:
    text = table(("guest", "error"), [["web1", None], ["web2", "x" * 150]])
    lines = text.splitlines()
    assert lines[0].split() == ["guest", "error"] and set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["web1", "-"] and lines[3].endswith("x" * 150)
