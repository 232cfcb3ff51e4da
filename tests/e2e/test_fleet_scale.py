"""Scale at small size: 4 namespace hosts, 8 small guests, all moved at once and back."""

from __future__ import annotations

from pathlib import Path

from scripts.testbed.fleet_scale import RunWatch, double_runs, move_all
from tests.conftest import fleet_of

HOSTS = ["s1", "s2", "s3", "s4"]
GUESTS_PER_HOST = 2


def test_every_guest_moves_to_another_host_at_once_and_back_never_running_twice(
        base_image: Path) -> None:
    with fleet_of(HOSTS, base_image) as fleet:
        home = {}
        guests = []
        for i, host in enumerate(HOSTS * GUESTS_PER_HOST):
            g = fleet.boot(host, fleet.guest(memory_mib=32))
            guests.append(g)
            home[g.name] = (host, HOSTS[(HOSTS.index(host) + 1 + i // len(HOSTS)) % 4])
        for g in guests:
            g.wait_counter_above(0)
        there = [(g.name, *home[g.name]) for g in guests]
        back = [(name, dst, src) for name, src, dst in there]
        for moves in (there, back):
            watch = RunWatch(fleet.client.settings, HOSTS)
            watch.start()
            try:
                result = move_all(fleet.client, moves, timeout=180)
            finally:
                sightings = watch.stop()
            assert [o.error for o in result.failures] == []
            assert double_runs(sightings, moves) == []
            assert len({s.host for s in sightings}) == len(HOSTS), "every host was watched"
            assert set().union(*(s.running for s in sightings)) >= set(home)
            for name, _, dst in moves:
                assert fleet.running_on(next(g for g in guests if g.name == name)) == [dst]
        assert {dst for _, _, dst in there} == set(HOSTS)
        for g in guests:  # one copy ran at a time: the counter never went back
            last = g.counters()[-1]
            assert g.wait_counter_above(last) > last
            seen = g.counters()
            assert seen == sorted(seen) and len(seen) == len(set(seen))
            g.wait_kept_running(more=1)  # and never restarted: one boot all through
