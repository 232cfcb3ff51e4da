"""Per-host limits on concurrent migrations, first come first served.

Like Nova's max_concurrent_live_migrations: a host runs at most N outgoing
(and M incoming) migrations; the others wait their turn in arrival order.
A Redis list per host and direction holds the jobs in arrival order; a job
may go on while it is among the first N.  A waiting task does not hold a
worker thread: it is retried shortly (Celery retry), keeping its place.
"""

from __future__ import annotations

import time

import redis

STALE_S = 6 * 3600  # an entry older than any migration is a leftover


def _key(host: str, direction: str) -> str:
    return f"ferry:slots:{host}:{direction}"


class Slots:
    def __init__(self, client: redis.Redis, host: str) -> None:
        self.redis = client
        self.host = host

    def take(self, direction: str, job_id: str, limit: int) -> bool:
        """Join the line (once) and say whether this job may go on now."""
        key = _key(self.host, direction)
        entries = [e.decode() if isinstance(e, bytes) else str(e)
                   for e in self.redis.lrange(key, 0, -1)]
        mine = [e for e in entries if e.split("|", 1)[0] == job_id]
        if not mine:
            self.redis.rpush(key, f"{job_id}|{time.time():.0f}")
            entries = [e.decode() if isinstance(e, bytes) else str(e)
                       for e in self.redis.lrange(key, 0, -1)]
        self._prune(key, entries)
        ids = [e.split("|", 1)[0] for e in entries]
        return ids.index(job_id) < limit if job_id in ids else False

    def _prune(self, key: str, entries: list[str]) -> None:
        now = time.time()
        for entry in entries:
            _, _, since = entry.partition("|")
            if since and now - float(since) > STALE_S:
                self.redis.lrem(key, 0, entry)

    def give_back(self, direction: str, job_id: str) -> None:
        key = _key(self.host, direction)
        for entry in self.redis.lrange(key, 0, -1):
            text = entry.decode() if isinstance(entry, bytes) else str(entry)
            if text.split("|", 1)[0] == job_id:
                self.redis.lrem(key, 0, text)
