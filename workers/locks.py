"""Leases that keep a guest and its writable disks on one host at a time.

Resources: `domain:<uuid>` and `disk:<resolved path>` for every writable,
non-shareable disk.  In Redis:

    ferry:lease:<resource>     JSON {host, domain, uuid, pid, gen}, expires unless renewed
    ferry:leasegen:<resource>  a generation that only goes up (every acquire and release)

Acquire takes every lease or none (one Lua script).  Release hands back an
opaque lockstate (the generations after release); acquiring with a lockstate
is refused if anybody acquired one of its leases since (a lease it does not
name, such as the dest's own copy of a disk, only has to be free).  A host renews its leases
with its heartbeat; a dead host's leases expire after the TTL, never before.

With a Sentinel broker an acquire waits for a replica to have it
(config/replication.py): a lease a failover could drop is given back and the
acquire fails.  A release does not wait: a lost release leaves the lease with
the host that released it, which refuses the dest (the source resumes), never
lets two hosts in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable

import redis

from config.replication import ReplicaWaitError, guarded_write
from workers.domain import DomainDef, writable_disks
from workers.errors import OperationInvalidError

log = logging.getLogger(__name__)

_ACQUIRE = """
-- KEYS: lease keys then gen keys; ARGV: owner json, ttl ms, check (0/1), n, then states
local n = tonumber(ARGV[4])
local owner = cjson.decode(ARGV[1])
for i = 1, n do
  local cur = redis.call('GET', KEYS[i])
  if cur then
    local holder = cjson.decode(cur)
    if holder.host ~= owner.host or holder.uuid ~= owner.uuid then
      return {'held', i, cur}
    end
  end
  if ARGV[3] == '1' and ARGV[4 + i] ~= '*' then
    local gen = redis.call('GET', KEYS[n + i]) or '0'
    if gen ~= ARGV[4 + i] then return {'changed', i, gen} end
  end
end
for i = 1, n do
  local gen = redis.call('INCR', KEYS[n + i])
  owner.gen = gen
  redis.call('SET', KEYS[i], cjson.encode(owner), 'PX', ARGV[2])
end
return {'ok', 0, ''}
"""

_RELEASE = """
-- KEYS: lease keys then gen keys; ARGV: host, uuid, n.  Returns the generations after.
local n = tonumber(ARGV[3])
local gens = {}
for i = 1, n do
  local cur = redis.call('GET', KEYS[i])
  if cur then
    local holder = cjson.decode(cur)
    if holder.host == ARGV[1] and holder.uuid == ARGV[2] then
      redis.call('DEL', KEYS[i])
      redis.call('INCR', KEYS[n + i])
    end
  end
  gens[i] = redis.call('GET', KEYS[n + i]) or '0'
end
return gens
"""


def resources(d: DomainDef) -> list[str]:
    disks = sorted({os.path.realpath(disk.source) for disk in writable_disks(d)
                    if disk.source})
    return [f"domain:{d.uuid}", *(f"disk:{path}" for path in disks)]


def describe(resource: str, holder: dict[str, object]) -> str:
    kind, _, what = resource.partition(":")
    who = f"guest {holder.get('domain')} on host {holder.get('host')}"
    return f"disk {what} is in use by {who}" if kind == "disk" else f"domain {what} runs as {who}"


class NoLocks:
    """lock_manager = none: nothing is held, v2 is fine."""

    driver = "none"
    keeps_state = False

    def acquire(self, d: DomainDef, host: str, pid: int, state: str | None = None,
                check_state: bool = True) -> None:
        return None

    def release(self, d: DomainDef, host: str) -> str | None:
        return None

    def renew(self, held: Iterable[DomainDef], host: str) -> None:
        return None

    def holders(self, d: DomainDef) -> dict[str, dict[str, object] | None]:
        return {}


class RedisLocks:
    driver = "redis"
    keeps_state = True

    def __init__(self, client: redis.Redis, ttl_ms: int) -> None:
        self.redis = client
        self.ttl_ms = ttl_ms
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

    @staticmethod
    def _keys(res: list[str]) -> list[str]:
        return [f"ferry:lease:{r}" for r in res] + [f"ferry:leasegen:{r}" for r in res]

    def acquire(self, d: DomainDef, host: str, pid: int, state: str | None = None,
                check_state: bool = True) -> None:
        """Take every lease of `d` or none; with `state`, only if nobody took one since.

        A lease the state does not name (a disk the dest has at another path: a storage
        copy) was never handed over: it only has to be free.
        """
        res = resources(d)
        gens = parse_state(state) if state else {}
        check = bool(state) and check_state
        owner = json.dumps({"host": host, "domain": d.name, "uuid": d.uuid, "pid": pid})
        argv = [owner, self.ttl_ms, "1" if check else "0", len(res),
                *(gens.get(r, "*") for r in res)]
        keys = self._keys(res)
        try:
            [(status, index, detail)] = guarded_write(
                self.redis, lambda pipe: self._acquire(keys=keys, args=argv, client=pipe),
                f"the leases of {d.name} taken on {host}")
        except ReplicaWaitError as exc:
            (status, index, detail), = exc.replies
            if (status.decode() if isinstance(status, bytes) else status) == "ok":
                log.warning("leases of %s: no replica has them, giving them back", d.name)
                with contextlib.suppress(redis.RedisError):
                    self._release(keys=keys, args=[host, d.uuid, len(res)])
                raise
        status = status.decode() if isinstance(status, bytes) else status
        if status == "ok":
            log.info("leases of %s acquired on %s: %s", d.name, host, ", ".join(res))
            return
        resource = res[int(index) - 1]
        if status == "held":
            raise OperationInvalidError(describe(resource, json.loads(detail)))
        raise OperationInvalidError(
            f"lease {resource} was acquired by someone else since it was released "
            f"(generation {int(detail)}, expected {gens.get(resource)})")

    def release(self, d: DomainDef, host: str) -> str:
        res = resources(d)
        gens = self._release(keys=self._keys(res), args=[host, d.uuid, len(res)])
        log.info("leases of %s released on %s", d.name, host)
        return format_state(dict(zip(res, (g.decode() if isinstance(g, bytes) else str(g)
                                           for g in gens), strict=True)))

    def renew(self, held: Iterable[DomainDef], host: str) -> None:
        pipe = self.redis.pipeline()
        for d in held:
            for r in resources(d):
                pipe.pexpire(f"ferry:lease:{r}", self.ttl_ms)
        pipe.execute()

    def holders(self, d: DomainDef) -> dict[str, dict[str, object] | None]:
        out: dict[str, dict[str, object] | None] = {}
        for r in resources(d):
            raw = self.redis.get(f"ferry:lease:{r}")
            out[r] = None if raw is None else dict(json.loads(raw))
        return out


def format_state(gens: dict[str, str]) -> str:
    return "\n".join(f"{gen} {res}" for res, gen in sorted(gens.items()))


def parse_state(state: str) -> dict[str, str]:
    out = {}
    for line in state.strip().splitlines():
        gen, _, res = line.strip().partition(" ")
        if not gen.isdigit() or not res:
            raise OperationInvalidError(f"malformed lockstate line: {line!r}")
        out[res] = gen
    return out


LockManager = NoLocks | RedisLocks


def make(kind: str, client: redis.Redis, ttl_ms: int) -> LockManager:
    return RedisLocks(client, ttl_ms) if kind == "redis" else NoLocks()
