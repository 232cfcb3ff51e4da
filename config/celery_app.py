"""The Celery app shared by workers and clients, and the queue routing.

Tasks register on `app` at import; `configure()` points it at a broker once
settings are known, so importing ferry never reads the environment.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from config import broker
from config.errors import InvalidInputError
from config.settings import Settings

log = logging.getLogger(__name__)
app = Celery("ferry", set_as_current=True)

TASK_MODULES = ["tasks.domain", "tasks.migration", "tasks.p2p", "tasks.images"]


def queue_for(host: str) -> str:
    """The queue of host `host`: only that host's worker consumes it."""
    return f"host.{host}"


def client_app(settings: Settings) -> Celery:
    """A Celery app of a client's own, so clients of several brokers in one process
    (a service, a test) never reconfigure each other."""
    return configure(settings, Celery("ferry-client", set_as_current=False))


def configure(settings: Settings, target: Celery | None = None) -> Celery:
    """Point `target` (the workers' shared app by default) at the settings' broker."""
    target = app if target is None else target
    tls = broker.ssl_options(settings)
    target.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.broker_url,
        # rediss://: the same verified TLS as every other client (config/broker.py)
        broker_use_ssl=tls or False,
        redis_backend_use_ssl=tls,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Acknowledgement: a task's message is acknowledged only after the task
        # returns (acks_late), so a worker that dies mid-phase leaves the message
        # to be delivered again (phases are idempotent per job id); one message
        # at a time per thread (prefetch 1) so a long migration never holds
        # short tasks hostage; the Redis visibility timeout, after which an
        # unacknowledged message is redelivered, is longer than any migration.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": 6 * 3600},
        broker_connection_retry_on_startup=True,
        # Nothing is routed to Celery's default queue by accident: every call
        # names its host queue; an unrouted task waits in a queue nobody reads.
        task_default_queue="ferry.unrouted",
        task_create_missing_queues=True,
        # Flower and result-backend readers see names, arguments and progress.
        result_extended=True,
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        result_expires=24 * 3600,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        include=TASK_MODULES,
    )
    if settings.signing_key or settings.signing_cert or settings.signing_cert_store:
        _sign_messages(settings, target)
    return target


def _sign_messages(settings: Settings, target: Celery) -> None:
    """Celery's `auth` serializer: every task message this process sends is signed with
    FERRY_SIGNING_KEY, and only messages signed by a certificate in
    FERRY_SIGNING_CERT_STORE are accepted; unsigned (json) ones are refused.  Results,
    job records and signals stay plain JSON behind the broker's own password and TLS."""
    paths = (settings.signing_key, settings.signing_cert, settings.signing_cert_store)
    if not all(paths):
        raise InvalidInputError("message signing needs FERRY_SIGNING_KEY, FERRY_SIGNING_CERT "
                                "and FERRY_SIGNING_CERT_STORE together")
    missing = [str(p) for p in paths if p is not None and not p.exists()]
    if missing:
        raise InvalidInputError(f"message signing: {', '.join(missing)} does not exist")
    target.conf.update(
        task_serializer="auth", accept_content=["auth"], security_digest="sha256",
        security_key=str(settings.signing_key), security_certificate=str(settings.signing_cert),
        security_cert_store=str(settings.signing_cert_store))
    # json stays decodable for results and events (their accept lists name it); the
    # process-wide registry drops pickle, yaml and msgpack altogether.
    target.setup_security(allowed_serializers=["json"])


def survive_broker_restarts(settings: Settings) -> None:
    """Keep a worker alive when the broker restarts (called by `ferry worker` only).

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
    from celery.worker.consumer.consumer import Consumer
    from kombu.transport import redis as kombu_redis

    plain_lost = Consumer.on_connection_error_after_connected

    def on_connection_lost(self: Any, exc: Exception) -> None:
        transport = getattr(self.connection, "transport", None)
        for chan in list(getattr(transport, "channels", None) or ()):
            chan.do_restore = False
        plain_lost(self, exc)

    channel = kombu_redis.Channel
    plain_ack = channel.basic_ack

    def basic_ack(self: Any, delivery_tag: str, multiple: bool = False) -> None:
        if self.connection is not None and self.connection.client is not None:
            plain_ack(self, delivery_tag, multiple)
            return
        log.warning("acknowledging message %s of a connection lost meanwhile", delivery_tag)
        with broker.connect(settings, socket_timeout=5) as client:
            client.pipeline().zrem(self.unacked_index_key, delivery_tag) \
                .hdel(self.unacked_key, delivery_tag).execute()

    # methods of Celery's and kombu's classes, replaced in the worker process only
    setattr(Consumer, "on_connection_error_after_connected", on_connection_lost)  # noqa: B010
    setattr(channel, "basic_ack", basic_ack)  # noqa: B010


def reuse_publish_clients() -> None:
    """One redis-py client per kombu channel for its publishes (called by `ferry worker`).

    kombu 5.x builds a new `redis.Redis` over the channel's pool for every publish,
    acknowledgement and event flush (`Channel.conn_or_acquire`), ~0.16 ms of CPU each
    here, a dozen times per task.  A client is a thin, thread-safe handle on the
    pool, so the channel keeps one and builds a new one only when its pool is replaced
    (after a reconnection)."""
    from collections.abc import Iterator
    from contextlib import contextmanager

    from kombu.transport import redis as kombu_redis

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

    setattr(kombu_redis.Channel, "conn_or_acquire", conn_or_acquire)  # noqa: B010

