"""A retried storage copy copies only what changed: the policy, pure.

QEMU 7.2's blockdev-mirror cannot start from a bitmap, so the bulk copy is a
``blockdev-backup`` with a dirty bitmap D per disk on the source (``ferry-<attempt>``,
the attempt being the job that started the copy) in ``bitmap-mode: always``.  After a
failure D holds the clusters not yet copied plus every write made meanwhile; after
a success, the writes made during the job (QEMU's backup_cleanup_sync_bitmap).  Backup
rounds of ``sync: bitmap`` then converge; the guest is paused for a last small round
while a ``sync: none`` mirror takes over, D stays enabled, so after any failure D
covers everything the dest may lack.

A retry resumes a disk only when both ends vouch for the same attempt: Begin's cookie
names the attempt whose bitmap the source holds (``resume``), Prepare's names it back
when the dest kept that attempt's partial image (same guest, source host, path, size,
untouched since, within FERRY_STORAGE_RETRY_KEEP_S).  Any doubt is a full copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

BITMAP_PREFIX = "ferry-"
#: hand over to the live mirror once the bitmaps hold at most this much ...
HANDOVER_BYTES = 2 << 20
#: ... or a round shrank them by less than this share, or after this many rounds
SHRINK_MIN = 0.25
MAX_ROUNDS = 8


def bitmap_name(attempt: str) -> str:
    return f"{BITMAP_PREFIX}{attempt}"


def node_bitmaps(query_block: Iterable[Mapping[str, Any]], drive_id: str
                 ) -> tuple[str, dict[str, int]]:
    """The format node of a -drive and its ferry bitmaps (name -> dirty bytes)."""
    for entry in query_block:
        inserted = entry.get("inserted")
        if entry.get("device") != drive_id or not isinstance(inserted, Mapping):
            continue
        maps = {str(b["name"]): int(b.get("count") or 0)
                for b in inserted.get("dirty-bitmaps") or ()
                if str(b.get("name") or "").startswith(BITMAP_PREFIX)}
        return str(inserted.get("node-name") or ""), maps
    return "", {}


def held_attempt(bitmaps: Mapping[str, int]) -> str | None:
    """The attempt whose bitmap the source holds for a disk (one, or none: doubt)."""
    if len(bitmaps) != 1:
        return None
    return next(iter(bitmaps))[len(BITMAP_PREFIX):]


def resumable(offered: str | None, answered: str | None, bitmaps: Mapping[str, int]) -> bool:
    """Whether the source continues a disk's interrupted copy: it offered the attempt,
    the dest answered the same one, and its bitmap is still there."""
    return offered is not None and offered == answered and \
        bitmap_name(offered) in bitmaps


@dataclass(frozen=True)
class Kept:
    """A partial image the dest keeps after an interrupted copy (one record per image)."""

    attempt: str
    uuid: str  # the guest's
    source: str  # the source host
    path: str
    capacity: int  # the virtual size the source announced
    size: int  # the file's size and mtime when kept: anything else touched it
    mtime_ns: int
    until: float  # wall clock

    def problem(self, *, attempt: str | None, uuid: str, source: str, capacity: int,
                size: int, mtime_ns: int, now: float) -> str | None:
        """Why this image cannot be continued by a retry (None: it can)."""
        checks = ((attempt is None, "the source holds no bitmap for it"),
                  (attempt != self.attempt, f"it is of attempt {self.attempt}, not {attempt}"),
                  (uuid != self.uuid, "it is another guest's"),
                  (source != self.source, f"it came from host {self.source}"),
                  (capacity != self.capacity, "the disk's size changed"),
                  ((size, mtime_ns) != (self.size, self.mtime_ns), "the file changed since"),
                  (now > self.until, "its keep time is over"))
        return next((why for bad, why in checks if bad), None)


def should_hand_over(history: Sequence[int], rounds: int) -> bool:
    """After the bulk copy and each round, the bitmaps' total: go live with the mirror
    once it is small, stops shrinking, or the rounds are spent."""
    if not history:
        return False
    last = history[-1]
    if last <= HANDOVER_BYTES or rounds >= MAX_ROUNDS:
        return True
    return len(history) > 1 and last > history[-2] * (1 - SHRINK_MIN)
