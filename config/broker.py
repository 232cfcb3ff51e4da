"""The one place Redis connections are made: every ferry client of the broker (job
records, leases, heartbeats, signals, tunnels, admission slots, the Celery broker
and result backend) gets its connection options here, so a `rediss://` URL means
the same verified TLS everywhere.

With `rediss://` the server's certificate is always verified (CERT_REQUIRED,
hostname checked) against FERRY_REDIS_CA, or the system's CA store when it is
unset; FERRY_REDIS_CERT / FERRY_REDIS_KEY add a client certificate for a Redis
with `tls-auth-clients yes`.  Kombu alone would connect to a rediss:// URL
without any verification (CERT_NONE, a warning); ferry never does.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aredis
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from config.settings import Settings

log = logging.getLogger(__name__)


def uses_tls(settings: Settings) -> bool:
    return settings.broker_url.startswith("rediss://")


def ssl_options(settings: Settings) -> dict[str, Any] | None:
    """redis-py / kombu / Celery SSL keywords for the broker, None for plain redis://."""
    if not uses_tls(settings):
        return None
    opts: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.redis_ca:
        opts["ssl_ca_certs"] = str(settings.redis_ca)
    if settings.redis_cert:
        opts["ssl_certfile"] = str(settings.redis_cert)
    if settings.redis_key:
        opts["ssl_keyfile"] = str(settings.redis_key)
    return opts


def _kwargs(settings: Settings, extra: dict[str, Any]) -> dict[str, Any]:
    opts = ssl_options(settings) or {}
    if opts:
        opts = {**opts, "ssl_check_hostname": True}
    return {**opts, **extra}


class RetryingRedis(redis.Redis):
    """A client that rides out a broker restart: a command that meets a lost
    connection (or a Redis still loading its data) is tried again with jittered
    exponential waits, for `retry_s` seconds at most, then the error is raised.
    ferry's commands are safe to repeat (HSET, SET, DEL, compare-and-set scripts)."""

    retry_s: float = 0.0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        # redis-py leaves execute_command unannotated
        plain: Callable[..., Any] = super().execute_command
        if self.retry_s <= 0:
            return plain(*args, **options)
        for attempt in Retrying(
                stop=stop_after_delay(self.retry_s),
                wait=wait_random_exponential(multiplier=0.05, max=1.0),
                retry=retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
                before_sleep=before_sleep_log(log, logging.WARNING), reraise=True):
            with attempt:
                return plain(*args, **options)
        raise AssertionError("unreachable")  # pragma: no cover (reraise=True)


def connect(settings: Settings, retry: bool = False, **kwargs: Any) -> redis.Redis:
    """A blocking client of the broker (TLS options from the settings); with `retry`,
    one that retries for FERRY_BROKER_RETRY_S while the broker is away (the
    worker's own: job records, leases, heartbeat, admission slots)."""
    if not retry:
        return redis.Redis.from_url(settings.broker_url, **_kwargs(settings, kwargs))
    client = RetryingRedis.from_url(settings.broker_url, **_kwargs(settings, kwargs))
    assert isinstance(client, RetryingRedis)
    client.retry_s = settings.broker_retry_s
    return client


def connect_async(settings: Settings, **kwargs: Any) -> aredis.Redis:
    """An asyncio client of the broker, for the agent loop (job signals)."""
    return aredis.Redis.from_url(settings.broker_url, **_kwargs(settings, kwargs))
