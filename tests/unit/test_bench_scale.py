"""The scale bench's pure parts: where guests go, and the per-N summary."""

from __future__ import annotations

from scripts.bench.scale import HOSTS, _placement, summarize


def test_every_guest_moves_to_another_host_and_all_hosts_send_and_receive() -> None:
    places = _placement(8)
    assert all(home != dest for home, dest in places)
    assert {h for h, _ in places} == {d for _, d in places} == set(HOSTS)


def _run(there: list[float], back: list[float], failures: int = 0) -> dict[str, object]:
    return {"there": {"total_ms": max(there), "each_ms": there, "failures": ["x"] * failures,
                      "double_runs": []},
            "back": {"total_ms": max(back), "each_ms": back, "failures": [],
                     "double_runs": []}}


def test_the_summary_gives_medians_maxima_failures_and_ferry_to_floor_ratios() -> None:
    ferry = [_run([100, 300], [200, 200]), _run([100, 100], [400, 100], failures=1)]
    floor = [_run([50, 50], [100, 50]), _run([50, 50], [100, 100])]
    out = summarize(2, ferry, floor, {"worker h1": 1.0, "redis": 0.5}, {1: "worker h1",
                                                                           2: "redis"})
    assert out["ferry"]["total_ms"] == 250.0 and out["floor"]["total_ms"] == 75.0
    assert out["total_ratio"] == round(250 / 75, 2)
    assert out["ferry"]["each_max_ms"] == 400 and out["ferry"]["each_median_ms"] == 150.0
    assert (out["ferry"]["failures"], out["ferry"]["migrations"]) == (1, 9)
    assert out["cpu_s"] == {"workers": 1.0, "redis": 0.5}
