"""Progress and convergence policy: pure functions of QEMU's figures and time.

- `ProgressTracker` turns successive query-migrate figures into what an
  operator reads: a percentage that never goes backwards, an estimate of
  the time left, and a `stalled` mark when remaining data stops shrinking.
- `TransferWatch` notices a stream that sends nothing (a cut network: QEMU's
  socket blocks while TCP retransmits for many minutes, and QEMU has no
  timeout of its own), so Perform can cancel it in bounded time.
- `downtime_steps` is Nova's schedule: the allowed downtime rises in steps
  over time (delay per GiB of guest memory), so a migration that does not
  converge at a small downtime eventually does at a larger one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

STALL_WINDOW_S = 2.0  # remaining data must shrink within this window


def downtime_steps(max_downtime_ms: int, steps: int, delay_s_per_gib: float,
                   data_gib: float) -> Iterator[tuple[float, int]]:
    """(seconds after start, allowed downtime ms), as nova.virt.libvirt.migration does."""
    delay = delay_s_per_gib * max(data_gib, 0.1)
    base = max_downtime_ms / steps
    offset = (max_downtime_ms - base) / steps
    for i in range(steps + 1):
        yield (delay * i, int(base + offset * i))


@dataclass
class ProgressTracker:
    """Successive figures in; operator-facing progress out."""

    best_percent: float = 0.0
    low_remaining: int | None = None
    low_since: float = 0.0
    history: list[tuple[float, int]] = field(default_factory=list)

    def update(self, stats: dict[str, Any], now: float) -> dict[str, Any]:
        """Memory and disks (a storage copy) together, as libvirt's data_* figures."""
        total = _both(stats, "total")
        remaining = _both(stats, "remaining")
        processed = int(stats.get("memory_processed") or 0)
        bps = _both(stats, "bps")
        if total and stats.get("status") != "setup":
            percent = 100.0 * (1 - remaining / total) if remaining <= total else 0.0
            self.best_percent = max(self.best_percent, min(percent, 100.0))
        stalled = self._stalled(remaining, now) if total else False
        eta = round(remaining / bps, 2) if bps > 0 else None
        return {**stats, "percent": round(self.best_percent, 1), "eta_s": eta,
                "stalled": stalled, "memory_processed": processed}

    def _stalled(self, remaining: int, now: float) -> bool:
        if self.low_remaining is None or remaining < self.low_remaining:
            self.low_remaining, self.low_since = remaining, now
            return False
        return now - self.low_since >= STALL_WINDOW_S


def _both(stats: dict[str, Any], what: str) -> int:
    return int(stats.get(f"memory_{what}") or 0) + int(stats.get(f"disk_{what}") or 0)


@dataclass
class TransferWatch:
    """Bytes sent must grow within `limit_s` (0: never give up)."""

    limit_s: float
    best: int = -1
    since: float | None = None

    def update(self, processed: int, now: float) -> None:
        if self.since is None or processed > self.best:
            self.best, self.since = processed, now

    def stuck(self, now: float) -> bool:
        return self.limit_s > 0 and self.since is not None and \
            now - self.since >= self.limit_s


@dataclass
class DowntimeSchedule:
    """Which step of the schedule is due; a step applies once."""

    steps: list[tuple[float, int]]
    applied: int = -1

    def due(self, elapsed_s: float, stalled: bool) -> int | None:
        """The downtime to set now, if a new step is due (early when stalled)."""
        nxt = self.applied + 1
        if nxt >= len(self.steps):
            return None
        at, downtime = self.steps[nxt]
        if elapsed_s >= at or (stalled and nxt > 0):
            self.applied = nxt
            return downtime
        return None
