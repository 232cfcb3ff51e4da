"""The admission lines' Redis scripts (workers/slots.py) on the real redis-server."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from scripts.testbed.stack import Stack
from workers.slots import STALE_S, Slots


@pytest.fixture
def line(stack: Stack) -> Iterator[tuple[Slots, str]]:
    """A line of a host of its own; its key goes after the test."""
    host = f"lines-{uuid.uuid4().hex[:8]}"
    yield Slots(stack.redis_client(), host), f"ferry:slots:{host}:out"
    stack.redis_client().delete(f"ferry:slots:{host}:out")


def test_jobs_join_a_line_once_in_arrival_order_and_the_first_up_to_the_limit_go(
        stack: Stack, line: tuple[Slots, str]) -> None:
    slots, key = line
    assert [slots.place("out", j, 2) for j in ("a", "b", "c", "d")] == [0, 0, 1, 2]
    assert slots.place("out", "c", 2) == 1, "asking again keeps the place"
    assert [e.split(b"|")[0] for e in stack.redis_client().lrange(key, 0, -1)] == \
        [b"a", b"b", b"c", b"d"]


def test_giving_back_lets_the_next_in_line_go_and_touches_no_other_job(
        stack: Stack, line: tuple[Slots, str]) -> None:
    slots, key = line
    for j in ("a", "b", "ab"):
        slots.place("out", j, 1)
    slots.give_back("out", "a")
    assert slots.place("out", "b", 1) == 0
    assert slots.place("out", "ab", 1) == 1, "'ab' is not 'a'"
    slots.give_back("out", "gone")  # not in the line: nothing happens
    assert stack.redis_client().llen(key) == 2


def test_an_entry_older_than_any_migration_leaves_the_line_when_a_job_joins(
        stack: Stack, line: tuple[Slots, str]) -> None:
    slots, key = line
    stack.redis_client().rpush(key, f"lost|{time.time() - STALE_S - 60:.0f}")
    assert slots.place("out", "new", 1) == 0
    assert [e.split(b"|")[0] for e in stack.redis_client().lrange(key, 0, -1)] == [b"new"]


def test_a_job_whose_own_entry_went_stale_joins_the_line_again_at_the_end(
        stack: Stack, line: tuple[Slots, str]) -> None:
    slots, key = line
    stack.redis_client().rpush(key, f"me|{time.time() - STALE_S - 60:.0f}",
                               f"other|{time.time():.0f}")
    assert slots.place("out", "me", 1) == 1
    assert [e.split(b"|")[0] for e in stack.redis_client().lrange(key, 0, -1)] == \
        [b"other", b"me"]
