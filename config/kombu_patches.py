"""The methods of kombu and Celery that a ferry worker replaces, in one place.

Each replacement is written against one release of the package that owns the
method, and is applied only there: on any other release (or when the method's
signature or an attribute the replacement uses is not what it was written for)
it is refused with a warning that says why and what the worker lacks without
it, and the package's own method stays.  pyproject.toml pins these packages
with compatible-release pins; tests/unit/test_kombu_patches.py fails when a
replaced method's signature or source differs from what is recorded here, so a
new release is read before it is allowed.

Only `ferry worker` applies them (through `config.celery_app`); clients never do.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import celery
import kombu
from celery.worker.consumer.consumer import Consumer
from kombu.transport import redis as kombu_redis

from config import broker
from config.settings import Settings

log = logging.getLogger(__name__)

# The releases the replacements below were read against and tested with.
WRITTEN_FOR: dict[str, tuple[str, ...]] = {
    "celery": ("5.7.0",),
    "kombu": ("5.7.0",),
}

# Marks a function as one of ours, so a second call never wraps a replacement.
_MARK = "__ferry_replacement__"


@dataclass(frozen=True)
class Replacement:
    """One replaced method and what it was written against."""

    owner: type
    name: str
    package: str  # the distribution whose release the replacement was written for
    signature: str  # str(inspect.signature(the package's method))
    source_sha256: str  # of inspect.getsource(the package's method); checked by the tests
    relies_on: tuple[str, ...]  # other attributes of `owner` the replacement uses
    without: str  # what the worker lacks when the replacement is refused

    @property
    def qualname(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"


CONNECTION_LOST = Replacement(
    owner=Consumer, name="on_connection_error_after_connected", package="celery",
    signature="(self, exc)",
    source_sha256="4f84dbfff329d28f48fb7dffad999b194b4b12bc1e3b444161ec106efce91f64",
    relies_on=(),
    without="unacknowledged messages are restored through a detached transport when the "
            "broker goes away (the worker may exit, a running phase may be delivered again)")

BASIC_ACK = Replacement(
    owner=kombu_redis.Channel, name="basic_ack", package="kombu",
    signature="(self, delivery_tag, multiple=False)",
    source_sha256="3b4278c757b44675f86fef3838b0e2fd4311d2e77944725e33f875f9378f02a1",
    relies_on=("do_restore", "unacked_key", "unacked_index_key"),
    without="a task that ends after a broker reconnection acknowledges on the lost channel "
            "(the worker may exit)")

CONN_OR_ACQUIRE = Replacement(
    owner=kombu_redis.Channel, name="conn_or_acquire", package="kombu",
    signature="(self, client=None)",
    source_sha256="25883caca6c4121e73463ac71db4a7037981634eb84b715c2280edaa609c080a",
    relies_on=("pool", "_create_client"),
    without="every publish builds a new redis client (slower, same behaviour)")

REPLACEMENTS = (CONNECTION_LOST, BASIC_ACK, CONN_OR_ACQUIRE)


_PACKAGES = {"celery": celery, "kombu": kombu}


def installed_version(package: str) -> str:
    """The release of `package` this process runs (its `__version__`)."""
    return str(getattr(_PACKAGES[package], "__version__", "unknown"))


def refusal(replacement: Replacement) -> str | None:
    """Why `replacement` must not be applied here, or None when it may."""
    version = installed_version(replacement.package)
    written_for = WRITTEN_FOR[replacement.package]
    if version not in written_for:
        return (f"{replacement.package} {version} is installed, the replacement was written "
                f"for {replacement.package} {', '.join(written_for)}")
    current = getattr(replacement.owner, replacement.name, None)
    if current is None:
        return f"{replacement.qualname} does not exist"
    signature = str(inspect.signature(current))
    if signature != replacement.signature:
        return (f"{replacement.qualname} has signature {signature}, the replacement was "
                f"written for {replacement.signature}")
    missing = [a for a in replacement.relies_on if not hasattr(replacement.owner, a)]
    if missing:
        return f"{replacement.owner.__qualname__} has no {', '.join(missing)}"
    return None


def replace(replacement: Replacement, make: Callable[[Any], Callable[..., Any]]) -> bool:
    """Replace the method with `make(the package's method)`, unless refused (logged).

    True when the replacement is in place (now or from an earlier call)."""
    current = getattr(replacement.owner, replacement.name, None)
    if getattr(current, _MARK, False):
        return True
    reason = refusal(replacement)
    if reason is not None:
        log.warning("not replacing %s: %s; without it %s", replacement.qualname, reason,
                    replacement.without)
        return False
    new = make(current)
    setattr(new, _MARK, True)
    setattr(replacement.owner, replacement.name, new)
    return True


def survive_broker_restarts(settings: Settings) -> None:
    """Keep a worker alive when the broker restarts.

    Two kombu 5.7 holes make a Celery worker exit when Redis goes away and
    comes back: (1) closing the lost connection restores unacknowledged messages
    through a transport already detached; (2) a task that finishes after the
    reconnection acknowledges its message on the lost channel.  Both raise an
    AttributeError that ends the worker.  ferry never wants (1) on a lost
    connection anyway: a late-acked phase still running here would be put back
    in its queue and delivered again while it runs; its message stays in Redis
    (as after a killed worker) and is acknowledged when the phase ends.  For (2)
    the acknowledgement is made with a client of our own, so the message is not
    delivered again hours later.  A graceful shutdown still restores as before.
    """

    def connection_lost(plain_lost: Callable[[Any, Exception], None]) -> Callable[..., None]:
        def on_connection_lost(self: Any, exc: Exception) -> None:
            transport = getattr(self.connection, "transport", None)
            for chan in list(getattr(transport, "channels", None) or ()):
                chan.do_restore = False
            plain_lost(self, exc)
        return on_connection_lost

    def ack(plain_ack: Callable[[Any, str, bool], None]) -> Callable[..., None]:
        def basic_ack(self: Any, delivery_tag: str, multiple: bool = False) -> None:
            if self.connection is not None and self.connection.client is not None:
                plain_ack(self, delivery_tag, multiple)
                return
            log.warning("acknowledging message %s of a connection lost meanwhile", delivery_tag)
            with broker.connect(settings, socket_timeout=5) as client:
                client.pipeline().zrem(self.unacked_index_key, delivery_tag) \
                    .hdel(self.unacked_key, delivery_tag).execute()
        return basic_ack

    replace(CONNECTION_LOST, connection_lost)
    replace(BASIC_ACK, ack)


def reuse_publish_clients() -> None:
    """One redis-py client per kombu channel for its publishes.

    kombu 5.x builds a new `redis.Redis` over the channel's pool for every publish,
    acknowledgement and event flush (`Channel.conn_or_acquire`), ~0.16 ms of CPU each
    here, a dozen times per task.  A client is a thin, thread-safe handle on the
    pool, so the channel keeps one and builds a new one only when its pool is replaced
    (after a reconnection)."""

    def reuse(_plain: Any) -> Callable[..., Any]:
        @contextmanager
        def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
            if client:
                yield client
                return
            pool = self.pool
            cached = self.__dict__.get("_ferry_client")
            if cached is None or cached.connection_pool is not pool:
                cached = self._create_client()
                self.__dict__["_ferry_client"] = cached
            yield cached
        return conn_or_acquire

    replace(CONN_OR_ACQUIRE, reuse)
