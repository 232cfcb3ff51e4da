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

from config.replication import follow_master
from workers.host_records import HOSTS_SET, get_host, host_key, list_hosts, tls_fields

__all__ = ["HOSTS_SET", "VERSION", "Heartbeat", "get_host", "host_key", "list_hosts",
           "tls_fields"]

log = logging.getLogger(__name__)

VERSION = "0.1.0"


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
        follow_master(self._redis)  # a demoted master keeps no connection of ours for long
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
