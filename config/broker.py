"""The one place Redis connections are made: every ferry client of the broker (job
records, leases, heartbeats, signals, tunnels, admission slots, the Celery broker
and result backend) gets its connection options here, so a `rediss://` URL means
the same verified TLS everywhere.

With `rediss://` the server's certificate is always verified (CERT_REQUIRED,
hostname checked) against FERRY_REDIS_CA, or the system's CA store when it is
unset; FERRY_REDIS_CERT / FERRY_REDIS_KEY add a client certificate for a Redis
with `tls-auth-clients yes`.  Kombu alone would connect to a rediss:// URL
without any verification (CERT_NONE, a warning); ferry never does.

With a Sentinel URL (`sentinel://HOST:PORT;sentinel://...`, config/sentinel.py) every
client asks the sentinels for the current master of FERRY_SENTINEL_MASTER and
connects there (redis-py's `Sentinel.master_for`): when a connection to the master
is lost, or the old master answers READONLY after it was demoted, the next
connection asks the sentinels again, so a failover needs no restart of anything.
TLS is on in that mode when FERRY_REDIS_CA or FERRY_REDIS_CERT is set (a
`sentinel://` URL has no TLS scheme of its own), to the sentinels and the master
alike; FERRY_SENTINEL_PASSWORD is the sentinels' password, the URL's the master's.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aredis
import redis.asyncio.sentinel as asentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from config import sentinel
from config.settings import Settings

log = logging.getLogger(__name__)

# How long a client waits for one sentinel to accept a connection or answer before it
# asks the next one (a sentinel on a machine that is gone must not stall discovery).
SENTINEL_TIMEOUT_S = 2.0


def uses_sentinel(settings: Settings) -> bool:
    """Whether the broker URL is in Celery's Sentinel form."""
    return sentinel.is_sentinel(settings.broker_url)


def uses_tls(settings: Settings) -> bool:
    if uses_sentinel(settings):
        return bool(settings.redis_ca or settings.redis_cert)
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
    ferry's commands are safe to repeat (HSET, SET, DEL, compare-and-set scripts).

    `replica_wait_ms`: how long its guarded writes wait for a replica
    (config/replication.py); set for a Sentinel broker only."""

    retry_s: float = 0.0
    replica_wait_ms: int = 0

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


def sentinel_kwargs(settings: Settings, asynchronous: bool = False) -> dict[str, Any]:
    """Connection options of the sentinels themselves: their password, TLS, and short
    timeouts (Celery's `sentinel_kwargs` transport option takes the same)."""
    opts: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT_S,
                            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
                            # no retries with back-off on one sentinel: the next is asked
                            "retry": (AsyncRetry if asynchronous else Retry)(NoBackoff(), 0)}
    if settings.sentinel_password:
        opts["password"] = settings.sentinel_password
    tls = _kwargs(settings, {})
    if tls:
        opts.update(ssl=True, **tls)
    return opts


def _master_kwargs(settings: Settings, extra: dict[str, Any]) -> dict[str, Any]:
    """Options of the connections to the master: database and credentials from the URL,
    TLS from the settings, the caller's own (timeouts, buffer sizes)."""
    url = sentinel.parse(settings.broker_url)
    opts: dict[str, Any] = {"db": url.db}
    if url.password is not None:
        opts["password"] = url.password
    if url.username is not None:
        opts["username"] = url.username
    tls = _kwargs(settings, {})
    if tls:
        opts.update(ssl=True, **tls)
    return {**opts, **extra}


def newest_master(states: list[dict[str, Any]], min_other_sentinels: int = 0
                  ) -> tuple[str, int] | None:
    """The master address of the newest view among the sentinels' answers (the
    highest config epoch), leaving out one they see as down.  Asked of a majority
    of the sentinels (the first to answer; one on a lost machine goes last).

    redis-py takes the first sentinel's answer; right after a failover a sentinel
    that has not heard of it yet still names the old master, which may be back by
    then as a replica: reads would go to it.  The sentinel that led the failover
    holds the new epoch."""
    best: dict[str, Any] | None = None
    for state in states:
        if not state.get("is_master") or state.get("is_sdown") or state.get("is_odown"):
            continue
        if int(state.get("num-other-sentinels", 0)) < min_other_sentinels:
            continue
        if best is None or int(state.get("config-epoch", 0)) > int(best.get("config-epoch", 0)):
            best = state
    return None if best is None else (str(best["ip"]), int(best["port"]))


def _state_of(masters: object, service_name: str) -> dict[str, Any] | None:
    """One master's state from SENTINEL MASTERS as redis-py parses it (a dict by name;
    a list of states under RESP3)."""
    if isinstance(masters, dict):
        state = masters.get(service_name)
        return state if isinstance(state, dict) else None
    for state in masters if isinstance(masters, list) else ():
        if isinstance(state, dict) and state.get("name") == service_name:
            return state
    return None


class _Sentinel(redis.sentinel.Sentinel):
    """redis-py's Sentinel manager, asking every sentinel and going by the newest view
    (`newest_master`); serialised, as a worker's task threads share one manager."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # redis-py leaves Sentinel's methods unannotated
        plain_init: Callable[..., None] = super().__init__
        plain_init(*args, **kwargs)
        self._discover_lock = threading.Lock()

    def discover_master(self, service_name: str) -> tuple[str, int]:
        with self._discover_lock:
            states, errors, answered = [], [], []
            for node in list(self.sentinels):
                try:
                    state = _state_of(node.sentinel_masters(), service_name)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    errors.append(f"{node} - {exc!r}")
                    continue
                answered.append(node)
                if state:
                    states.append(state)
                if len(answered) > len(self.sentinels) // 2:
                    break  # a majority answered: enough to see the newest view
            # the ones that answered first next time (a sentinel on a lost machine last)
            self.sentinels = answered + [n for n in self.sentinels if n not in answered]
            found = newest_master(states, self.min_other_sentinels)
            if found is None:
                raise redis.sentinel.MasterNotFoundError(
                    f"No master found for {service_name!r}"
                    + (f" : {', '.join(errors)}" if errors else ""))
            return found


class _AsyncSentinel(asentinel.Sentinel):
    """The same discovery for asyncio clients."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        states, errors, answered = [], [], []
        for node in list(self.sentinels):
            try:
                state = _state_of(await node.sentinel_masters(), service_name)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                errors.append(f"{node} - {exc!r}")
                continue
            answered.append(node)
            if state:
                states.append(state)
            if len(answered) > len(self.sentinels) // 2:
                break
        self.sentinels = answered + [n for n in self.sentinels if n not in answered]
        found = newest_master(states, self.min_other_sentinels)
        if found is None:
            raise asentinel.MasterNotFoundError(
                f"No master found for {service_name!r}"
                + (f" : {', '.join(errors)}" if errors else ""))
        return found


def master_address(settings: Settings) -> tuple[str, int] | None:
    """The current master's address as the sentinels tell it (None: no sentinel knows
    one now, or the broker URL is not a Sentinel URL).  For logs and tests."""
    if not uses_sentinel(settings):
        return None
    manager = _Sentinel(sentinel.parse(settings.broker_url).nodes,
                        sentinel_kwargs=sentinel_kwargs(settings))
    try:
        host, port = manager.discover_master(settings.sentinel_master)
        return (str(host), int(port))
    except redis.sentinel.MasterNotFoundError:
        return None
    finally:
        for node in manager.sentinels:
            node.close()


def connect(settings: Settings, retry: bool = False, **kwargs: Any) -> RetryingRedis:
    """A blocking client of the broker (TLS options from the settings); with `retry`,
    one that retries for FERRY_BROKER_RETRY_S while the broker is away (the
    worker's own: job records, leases, heartbeat, admission slots).  With a Sentinel
    URL, a client of whichever server is the master at the time of each connection,
    whose guarded writes wait for a replica (config/replication.py)."""
    cls = RetryingRedis
    if uses_sentinel(settings):
        manager = _Sentinel(sentinel.parse(settings.broker_url).nodes,
                            sentinel_kwargs=sentinel_kwargs(settings))
        master_for: Callable[..., Any] = manager.master_for  # unannotated in redis-py
        client = master_for(settings.sentinel_master, redis_class=cls,
                            **_master_kwargs(settings, kwargs))
    else:
        client = cls.from_url(settings.broker_url, **_kwargs(settings, kwargs))
    assert isinstance(client, RetryingRedis)
    client.retry_s = settings.broker_retry_s if retry else 0.0
    client.replica_wait_ms = settings.replica_wait_ms if uses_sentinel(settings) else 0
    return client


def connect_async(settings: Settings, **kwargs: Any) -> aredis.Redis:
    """An asyncio client of the broker, for the agent loop (job signals); with a
    Sentinel URL, of the current master, as `connect`."""
    if uses_sentinel(settings):
        make: Callable[..., asentinel.Sentinel] = _AsyncSentinel  # unannotated in redis-py
        manager = make(sentinel.parse(settings.broker_url).nodes,
                       sentinel_kwargs=sentinel_kwargs(settings, asynchronous=True))
        async_master_for: Callable[..., Any] = manager.master_for
        client = async_master_for(settings.sentinel_master, redis_class=aredis.Redis,
                                    **_master_kwargs(settings, kwargs))
        assert isinstance(client, aredis.Redis)
        return client
    return aredis.Redis.from_url(settings.broker_url, **_kwargs(settings, kwargs))


def lost_connection_note(settings: Settings) -> str:
    """What to add to the error of a stream that lost its broker connection: with
    Sentinel, that a failover (the master's machine lost) ends such a stream."""
    if not uses_sentinel(settings):
        return ""
    return (" (the connection to the broker's master was lost: a Sentinel failover, or a "
            "master restart, ends a tunnelled stream; the next migration uses the new "
            "master)")


def celery_transport_options(settings: Settings) -> dict[str, Any]:
    """What Celery's broker and result backend need for a Sentinel URL (kombu's
    SentinelChannel and Celery's SentinelBackend): the master's name and the
    sentinels' own connection options.  Empty for redis:// and rediss://."""
    if not uses_sentinel(settings):
        return {}
    return {"master_name": settings.sentinel_master,
            "sentinel_kwargs": sentinel_kwargs(settings)}
