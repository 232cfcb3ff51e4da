"""Per-host migration limits: extra migrations wait their turn in order."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from scripts.testbed.stack import Stack
from tasks.client import Client
from tests.conftest import Guest


@pytest.fixture
def one_at_a_time(stack: Stack) -> Iterator[str]:
    stack.start_worker("solo", env={"FERRY_MAX_OUTGOING_MIGRATIONS": "1"})
    yield "solo"
    stack.remove_worker("solo")


def test_with_a_limit_of_one_two_migrations_from_a_host_run_one_after_the_other(
        one_at_a_time: str, client: Client, make_guest: Callable[..., Guest]) -> None:
    guests = [make_guest(memory_mib=64, domain_type="qemu") for _ in range(2)]
    for g in guests:
        client.call(one_at_a_time, "define", xml=g.xml)
        client.call(one_at_a_time, "start", domain=g.name)
    jobs = [client.migrate(g.name, one_at_a_time, "beta", live=True) for g in guests]
    summaries = [j.wait(timeout=90) for j in jobs]

    assert all(s["result"] == "completed" for s in summaries)
    # The two Begin tasks race for the line: either may go first, never both at once.
    first, second = sorted((s["statistics"]["started"], s["statistics"]["stopped"])
                           for s in summaries)
    assert second[0] >= first[1], "the second migration waited for the first"
    for g in guests:
        assert client.call("beta", "dominfo", domain=g.name)["state"] == "running"
