"""Progress figures and the downtime schedule, from literal numbers."""

from __future__ import annotations

from workers.migration.progress import (
    DowntimeSchedule,
    ProgressTracker,
    TransferWatch,
    downtime_steps,
)


def test_downtime_steps_follow_novas_schedule() -> None:
    steps = list(downtime_steps(500, 10, 75, 1.0))
    assert steps[0] == (0, 50) and steps[-1] == (750, 500)
    assert len(steps) == 11
    assert [d for _, d in steps] == sorted(d for _, d in steps)


def test_small_guests_still_get_a_nonzero_delay_between_steps() -> None:
    steps = list(downtime_steps(400, 4, 10, 0.0))
    assert steps[1][0] > 0


def test_percentage_never_goes_backwards_when_dirty_pages_come_back() -> None:
    t = ProgressTracker()
    a = t.update({"memory_total": 100, "memory_remaining": 20, "memory_bps": 10}, 0.0)
    b = t.update({"memory_total": 100, "memory_remaining": 60, "memory_bps": 10}, 0.3)
    assert a["percent"] == 80.0 and b["percent"] == 80.0
    assert b["eta_s"] == 6.0


def test_stalled_is_marked_when_remaining_stops_shrinking_for_the_window() -> None:
    t = ProgressTracker()
    assert not t.update({"memory_total": 100, "memory_remaining": 50}, 0.0)["stalled"]
    assert not t.update({"memory_total": 100, "memory_remaining": 55}, 1.0)["stalled"]
    assert t.update({"memory_total": 100, "memory_remaining": 52}, 2.5)["stalled"]
    assert not t.update({"memory_total": 100, "memory_remaining": 10}, 3.0)["stalled"]


def test_schedule_applies_each_step_once_and_early_when_stalled() -> None:
    s = DowntimeSchedule([(0, 50), (10, 100), (20, 150)])
    assert s.due(0.0, False) == 50
    assert s.due(1.0, False) is None
    assert s.due(2.0, True) == 100
    assert s.due(2.5, False) is None
    assert s.due(25.0, False) == 150
    assert s.due(99.0, True) is None


def test_a_stream_that_sends_nothing_for_the_limit_is_stuck_and_any_byte_resets_it() -> None:
    w = TransferWatch(3.0)
    w.update(0, 10.0)
    assert not w.stuck(12.9)
    assert w.stuck(13.0)
    w.update(4096, 13.5)
    assert not w.stuck(16.0)
    w.update(4096, 16.4)  # the same figure again is no progress
    assert w.stuck(16.5)


def test_a_stall_limit_of_zero_never_gives_up() -> None:
    w = TransferWatch(0)
    w.update(0, 0.0)
    assert not w.stuck(1e6)
