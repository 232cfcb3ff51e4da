"""Every end-to-end test leaves nothing behind on the stacks it ran on.

After each test (and after its own fixtures are torn down) the stacks are read
from outside ferry (scripts/testbed/leftovers.py: processes, listening migration
ports, Redis keys of jobs and leases, state files) and compared with what was
there before the test; what a module-wide fixture keeps was there before and so
is allowed.  What goes away on its own gets a bounded time to do so.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from scripts.testbed.leftovers import snapshot, wait_left_over
from scripts.testbed.stack import started_stacks

SETTLE_S = 15.0  # a queued-migration key lives 5 s after its waiter; QEMU exits in <1 s


@pytest.fixture(autouse=True)
def nothing_left_over() -> Iterator[None]:
    before = snapshot(started_stacks())
    yield
    found = wait_left_over(before, started_stacks(), SETTLE_S)
    if found:
        pytest.fail(f"left over after the test (still there {SETTLE_S:.0f}s after it):\n  "
                    + "\n  ".join(found), pytrace=False)
