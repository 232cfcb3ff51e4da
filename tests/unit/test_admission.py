"""Admission lines: a job's place, and how a queued job reads in domjobinfo."""

from __future__ import annotations

from workers.jobs import jobinfo_view
from workers.slots import pair_name, waiting_place


def test_the_first_jobs_up_to_the_limit_go_and_the_rest_wait_numbered_from_one() -> None:
    line = ["a", "b", "c", "d"]
    assert [waiting_place(line, j, 2) for j in line] == [0, 0, 1, 2]


def test_a_job_missing_from_its_line_waits_behind_everyone() -> None:
    assert waiting_place(["a", "b", "c"], "z", 2) == 2
    assert waiting_place([], "z", 2) == 0 + 1


def test_a_pair_line_is_named_by_source_and_dest_in_that_order() -> None:
    assert pair_name("alpha", "beta") != pair_name("beta", "alpha")


def test_a_queued_migration_shows_phase_queued_with_its_line_and_place() -> None:
    queued = {"id": "j1", "line": "pair", "place": 3, "source": "alpha", "dest": "beta",
              "since": 100.0}
    view = jobinfo_view(None, "alpha", queued=queued, now=102.5)
    assert (view["type"], view["operation"], view["phase"]) == \
        ("unbounded", "outgoing_migration", "queued")
    assert (view["queue"], view["queue_position"], view["time_elapsed_ms"]) == \
        ("pair", 3, 2500)


def test_a_running_job_with_a_stale_queue_mark_of_another_job_is_not_queued() -> None:
    record = {"id": "j2", "kind": "migration", "phase": "perform3", "source": "alpha",
              "dest": "beta", "started": 100.0, "progress": {}, "error": None}
    queued = {"id": "j1", "line": "out", "place": 1, "source": "alpha", "dest": "beta",
              "since": 90.0}
    view = jobinfo_view(record, "alpha", queued=queued, now=101.0)
    assert view["phase"] == "perform3"
    assert view["queue"] is None and view["queue_position"] is None


def test_a_job_waiting_for_the_dests_incoming_line_is_queued_on_the_source_too() -> None:
    record = {"id": "j1", "kind": "migration", "phase": "begin3", "source": "alpha",
              "dest": "beta", "started": 100.0, "progress": {}, "error": None}
    queued = {"id": "j1", "line": "in", "place": 1, "source": "alpha", "dest": "beta",
              "since": 101.0}
    view = jobinfo_view(record, "alpha", queued=queued, now=102.0)
    assert (view["phase"], view["queue"], view["time_elapsed_ms"]) == ("queued", "in", 2000)
