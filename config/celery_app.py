"""The Celery app shared by workers and clients (queue routing: config/routing.py).

Tasks register on `app` at import; `configure()` points it at a broker once
settings are known, so importing ferry never reads the environment.
"""

from __future__ import annotations

from celery import Celery

from config import broker
from config.errors import InvalidInputError
from config.routing import queue_for
from config.settings import Settings

__all__ = ["TASK_MODULES", "app", "client_app", "configure", "queue_for",
           "reuse_publish_clients", "survive_broker_restarts"]

app = Celery("ferry", set_as_current=True)

TASK_MODULES = ["tasks.domain", "tasks.migration", "tasks.p2p", "tasks.images", "tasks.storage"]


def client_app(settings: Settings) -> Celery:
    """A Celery app of a client's own, so clients of several brokers in one process
    (a service, a test) never reconfigure each other."""
    return configure(settings, Celery("ferry-client", set_as_current=False))


def configure(settings: Settings, target: Celery | None = None) -> Celery:
    """Point `target` (the workers' shared app by default) at the settings' broker."""
    target = app if target is None else target
    tls = broker.ssl_options(settings)
    # sentinel://: the master's name and the sentinels' options, for both (config/broker.py)
    sentinel = broker.celery_transport_options(settings)
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
        broker_transport_options={"visibility_timeout": 6 * 3600, **sentinel},
        result_backend_transport_options=dict(sentinel),
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
    if sentinel:
        # A phase that ends while the sentinels promote a replica publishes the next
        # one once there is a master again (Celery's default gives up after ~0.6 s).
        target.conf.update(task_publish_retry_policy={
            "max_retries": 2 * settings.broker_retry_s + 2, "interval_start": 0,
            "interval_step": 0.5, "interval_max": 0.5})
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
    """Keep a worker alive when the broker restarts (called by `ferry worker` only):
    kombu's and Celery's methods replaced in config/kombu_patches.py, on the releases
    they were written for."""
    # start-up: kombu's redis transport and Celery's consumer are the worker's alone
    from config import kombu_patches

    kombu_patches.survive_broker_restarts(settings)


def reuse_publish_clients() -> None:
    """One redis-py client per kombu channel for its publishes (called by `ferry worker`
    only; config/kombu_patches.py)."""
    # start-up: kombu's redis transport and Celery's consumer are the worker's alone
    from config import kombu_patches

    kombu_patches.reuse_publish_clients()
