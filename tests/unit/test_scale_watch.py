"""The double-run rule of the scale watch, on literal sightings."""

from __future__ import annotations

from scripts.testbed.fleet_scale import Sighting, double_runs

MOVES = [("g1", "h1", "h2")]


def seen(sent: float, host: str, *names: str) -> Sighting:
    return Sighting(sent, sent + 0.01, host, frozenset(names))


def test_a_hand_over_seen_source_then_dest_is_not_a_double_run() -> None:
    sightings = [seen(0.0, "h1", "g1"), seen(0.1, "h2"), seen(0.2, "h1", "g1"),
                 seen(0.3, "h2", "g1"), seen(0.4, "h1")]
    assert double_runs(sightings, MOVES) == []


def test_the_source_running_after_the_dest_ran_the_guest_is_a_double_run() -> None:
    sightings = [seen(0.0, "h2", "g1"), seen(0.1, "h1", "g1")]
    assert double_runs(sightings, MOVES) == ["g1 seen running on h1 after h2 ran it"]


def test_a_guest_on_a_third_host_is_reported() -> None:
    assert double_runs([seen(0.0, "h3", "g1")], MOVES) == \
        ["g1 seen running on h3, neither h1 nor h2"]


def test_a_failed_move_that_stays_on_the_source_is_fine() -> None:
    assert double_runs([seen(0.0, "h1", "g1"), seen(1.0, "h1", "g1")], MOVES) == []
