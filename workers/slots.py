"""Limits on concurrent migrations, first come first served.

Like Nova's max_concurrent_live_migrations: a host runs at most N outgoing
(and M incoming) migrations, and a host pair (source, dest) at most P; the
others wait their turn in arrival order.  A Redis list per line (host and
direction, or pair) holds the jobs in arrival order; a job may go on while
it is among the first N.  A waiting task does not hold a worker thread: it
is retried shortly (Celery retry), keeping its place.

Lines are always taken in the order pair, out, in (and given back together
with out, or in), so no job waits for a line while holding a later one.
"""

from __future__ import annotations

import enum
import time

import redis


class Line(enum.StrEnum):
    """Which limit a migration waits for."""

    PAIR = "pair"  # source -> dest: FERRY_MAX_PAIR_MIGRATIONS
    OUT = "out"  # the source's outgoing: FERRY_MAX_OUTGOING_MIGRATIONS
    IN = "in"  # the dest's incoming: FERRY_MAX_INCOMING_MIGRATIONS


def pair_name(source: str, dest: str) -> str:
    """The 'host' a pair line is kept under (host names hold no '>')."""
    return f"{source}>{dest}"

STALE_S = 6 * 3600  # an entry older than any migration is a leftover


def _key(host: str, direction: str) -> str:
    return f"ferry:slots:{host}:{direction}"


class Slots:
    """One round trip per line: joining, pruning leftovers and reading the line happen
    in one script, atomically (two jobs joining at once keep one order)."""

    _JOIN = """
    local entries = redis.call('LRANGE', KEYS[1], 0, -1)
    local mine = false
    for _, e in ipairs(entries) do
        local id, since = string.match(e, '^([^|]*)|?(.*)$')
        local age = tonumber(ARGV[2]) - (tonumber(since) or tonumber(ARGV[2]))
        if age > tonumber(ARGV[3]) then redis.call('LREM', KEYS[1], 0, e)
        elseif id == ARGV[1] then mine = true end
    end
    if not mine then redis.call('RPUSH', KEYS[1], ARGV[1] .. '|' .. ARGV[2]) end
    return redis.call('LRANGE', KEYS[1], 0, -1)
    """

    _LEAVE = """
    local n = 0
    for _, e in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
        if string.match(e, '^([^|]*)') == ARGV[1] then n = n + redis.call('LREM', KEYS[1], 0, e) end
    end
    return n
    """

    def __init__(self, client: redis.Redis, host: str) -> None:
        self.redis = client
        self.host = host

    def take(self, direction: str, job_id: str, limit: int) -> bool:
        """Join the line (once) and say whether this job may go on now."""
        return self.place(direction, job_id, limit) == 0

    def place(self, direction: str, job_id: str, limit: int) -> int:
        """Join the line (once); 0 if this job may go on now, else its place among
        those waiting (1: next to go).  Entries older than STALE_S are leftovers of
        lost tasks and leave the line (a job whose own entry is that old joins anew,
        at the end)."""
        entries = self.redis.register_script(self._JOIN)(
            keys=[_key(self.host, direction)], args=[job_id, f"{time.time():.0f}", STALE_S])
        ids = [(e.decode() if isinstance(e, bytes) else str(e)).split("|", 1)[0]
               for e in entries]
        return waiting_place(ids, job_id, limit)

    def give_back(self, direction: str, job_id: str) -> None:
        self.redis.register_script(self._LEAVE)(keys=[_key(self.host, direction)],
                                                args=[job_id])


def give_back_all(client: redis.Redis, job_id: str, source: str, dest: str) -> None:
    """Take an ended job out of every line it may hold: the pair's, the source's
    outgoing, the dest's incoming (a job ended by neither its Confirm nor its Finish,
    e.g. by the sweeper, whose phases would have given them back)."""
    for host, line in ((pair_name(source, dest), Line.PAIR), (source, Line.OUT),
                       (dest, Line.IN)):
        Slots(client, host).give_back(line.value, job_id)


def waiting_place(ids: list[str], job_id: str, limit: int) -> int:
    """0 if `job_id` is among the first `limit` of the line, else its place among the
    waiting (1-based); a job not in the line (pruned meanwhile) waits at the end."""
    if job_id not in ids:
        return max(len(ids) - limit, 0) + 1
    index = ids.index(job_id)
    return 0 if index < limit else index - limit + 1
