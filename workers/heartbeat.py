"""A host's record in Redis, refreshed on a timer and expiring on its own.

A host is alive while its record exists: a worker that dies stops
refreshing and the record expires after the TTL, so `ferry hosts` and
clients stop routing work to it without anybody cleaning up.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

log = logging.getLogger(__name__)

HOSTS_SET = "ferry:hosts"
VERSION = "0.1.0"


def host_key(name: str) -> str:
    return f"ferry:host:{name}"


class Heartbeat:
    def __init__(
        self,
        client: redis.Redis,
        *,
        name: str,
        uuid: str,
        address: str,
        interval_ms: int,
        ttl_ms: int,
        guests: Callable[[], list[str]],
        on_beat: Callable[[], None] | None = None,
        tls: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._on_beat = on_beat
        self._tls = tls
        self._redis = client
        self._name, self._uuid, self._address = name, uuid, address
        self._interval = interval_ms / 1000
        self._ttl_ms = ttl_ms
        self._guests = guests
        self._started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ferry-heartbeat", daemon=True)

    def record(self) -> dict[str, Any]:
        return {
            "name": self._name,
            "uuid": self._uuid,
            "address": self._address,
            "version": VERSION,
            "pid": os.getpid(),
            "started": self._started,
            "guests": sorted(self._guests()),
            "beat": time.time(),
            "tls": self._tls() if self._tls is not None else None,
        }

    def beat(self) -> None:
        pipe = self._redis.pipeline()
        pipe.set(host_key(self._name), json.dumps(self.record()), px=self._ttl_ms)
        pipe.sadd(HOSTS_SET, self._name)
        pipe.execute()
        if self._on_beat is not None:
            self._on_beat()  # lease renewal rides on the heartbeat

    def start(self) -> None:
        self.beat()  # the first beat is synchronous: a started worker is listed at once
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self._redis.delete(host_key(self._name))
        except redis.RedisError as exc:
            log.warning("could not remove the host record: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed (will retry in %.1fs): %s", self._interval, exc)


def tls_fields(tls: Any) -> dict[str, Any]:
    """The hosts list's TLS fields from a heartbeat's `tls` (absent in older workers):
    tls (both ends' material valid), tls_required, tls_expires, tls_problems."""
    tls = tls if isinstance(tls, dict) else {}
    return {"tls": bool(tls.get("server") and tls.get("client")),
            "tls_required": bool(tls.get("required")),
            "tls_expires": tls.get("expires"), "tls_problems": list(tls.get("problems") or [])}


def list_hosts(client: redis.Redis) -> list[dict[str, Any]]:
    """Every host ever seen, alive or not, from the heartbeat records."""
    names = sorted(n.decode() if isinstance(n, bytes) else n for n in client.smembers(HOSTS_SET))
    hosts: list[dict[str, Any]] = []
    for name in names:
        raw = client.get(host_key(name))
        if raw is None:
            hosts.append(
                {"name": name, "uuid": None, "address": None, "alive": False, "guests": [],
                 **tls_fields(None)}
            )
            continue
        rec = json.loads(raw)
        hosts.append(
            {
                "name": name,
                "uuid": rec["uuid"],
                "address": rec["address"],
                "alive": True,
                "guests": rec["guests"],
                "version": rec["version"],
                **tls_fields(rec.get("tls")),
            }
        )
    return hosts


def get_host(client: redis.Redis, name: str) -> dict[str, Any] | None:
    raw = client.get(host_key(name))
    return None if raw is None else dict(json.loads(raw))
