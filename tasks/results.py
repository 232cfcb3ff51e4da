"""Waiting for a task's result without resting on one pub/sub message.

Celery's Redis backend reads a result once when the wait starts and then
waits for the message it publishes when the result is stored.  Redis does not
keep pub/sub messages for a subscriber whose connection is being made again
(after a broker restart), so a result stored in that moment is only ever found
by reading it again.  `wait` waits in slices and each slice reads it first.
"""

from __future__ import annotations

import time
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

SLICE_S = 2.0  # the longest a result stored during a reconnect goes unseen


def wait(result: AsyncResult, timeout: float | None, **kwargs: Any) -> Any:
    """`result.get(timeout, **kwargs)`, the stored result read again every SLICE_S."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = SLICE_S
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CeleryTimeout("The operation timed out.")
            step = min(step, left)
        try:
            return result.get(timeout=step, **kwargs)
        except CeleryTimeout:
            continue
