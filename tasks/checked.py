"""Task arguments come from anywhere (`send_task` by name, JSON): each task checks them
against its own annotations before it runs, so a missing field, an unknown one or a
wrong type is one clear InvalidInputError and nothing happens on the host.  `task`
registers a function as the ferry task `ferry.<name>` with its arguments checked."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from config.celery_app import app
from workers.errors import InvalidInputError

F = TypeVar("F", bound=Callable[..., Any])
_NAMES = {str: "a string", bool: "true or false", int: "an integer", dict: "a JSON object",
          list: "a JSON array", type(None): "null"}


def _matches(value: Any, expected: Any) -> bool:
    if expected is Any:
        return True
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    kind = origin or expected
    if kind is int:
        return type(value) is int  # JSON true is not a number of seconds
    if kind is type(None) or expected is None:
        return value is None
    return isinstance(value, kind)


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(expected))
    kind = origin or expected
    return _NAMES.get(kind, getattr(kind, "__name__", str(kind)))


def checked(fn: F) -> F:
    """Check a task's arguments against `fn`'s annotations (a bound task's `self` aside)."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    task = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidInputError(f"task {task}: {exc}") from None
        for name, value in bound.arguments.items():
            expected = hints.get(name, Any)
            if name != "self" and not _matches(value, expected):
                raise InvalidInputError(f"task {task}: argument '{name}' must be "
                                        f"{_describe(expected)}, not {type(value).__name__}")
        return fn(*args, **kwargs)

    return typing.cast(F, wrapper)


def task(name: str, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """`app.task(name="ferry.<name>", **options)` of `fn` with its arguments checked."""
    def register(fn: Callable[..., Any]) -> Any:
        return app.task(name=f"ferry.{name}", **options)(checked(fn))

    return register
