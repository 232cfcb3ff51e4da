"""Task arguments are checked against the task's annotations before it runs."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.checked import checked
from workers.errors import InvalidInputError

ran: list[tuple[object, ...]] = []


@checked
def start(domain: str, paused: bool = False, timeout: int | None = None,
          state: dict[str, Any] | None = None, anything: Any = None) -> str:
    ran.append((domain, paused, timeout, state, anything))
    return domain


@pytest.mark.parametrize("kwargs, needle", [
    ({}, "missing a required argument: 'domain'"),
    ({"domain": 5}, "'domain' must be a string, not int"),
    ({"domain": None}, "'domain' must be a string, not NoneType"),
    ({"domain": "g", "paused": "yes"}, "'paused' must be true or false, not str"),
    ({"domain": "g", "paused": 1}, "'paused' must be true or false, not int"),
    ({"domain": "g", "timeout": True}, "'timeout' must be an integer or null, not bool"),
    ({"domain": "g", "timeout": 1.5}, "'timeout' must be an integer or null, not float"),
    ({"domain": "g", "state": [1]}, "'state' must be a JSON object or null, not list"),
    ({"domain": "g", "colour": "red"}, "unexpected keyword argument 'colour'"),
])
def test_wrong_missing_or_unknown_arguments_are_refused_before_the_task_runs(
        kwargs: dict[str, Any], needle: str) -> None:
    ran.clear()
    with pytest.raises(InvalidInputError, match=needle) as err:
        start(**kwargs)
    assert str(err.value).startswith("task start: ") and ran == []


def test_right_arguments_run_the_task() -> None:
    ran.clear()
    assert start("g", True, timeout=None, state={"a": 1}, anything=[object()]) == "g"
    assert len(ran) == 1


def test_a_bound_task_skips_self() -> None:
    @checked
    def bound(self: Any, path: str) -> str:
        return path

    assert bound(object(), "/x") == "/x"
    with pytest.raises(InvalidInputError, match="'path'"):
        bound(object(), 7)
