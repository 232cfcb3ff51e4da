"""A client's connection to the broker: host records, calls of a host's tasks, job signals.

Every call checks the host's heartbeat first, so a host that does not exist
or has died is a clear error at once, and waits a bounded time for the
answer, so a host that stops answering is a clear error, never a hang.
tasks/client.py's Client (what services use) and a migration's handle
(tasks/migrate_client.py) both call hosts through it.
"""

from __future__ import annotations

from typing import Any

import redis
from celery.exceptions import TimeoutError as CeleryTimeout

from config import broker
from config.celery_app import client_app, queue_for
from config.settings import Settings, load
from tasks import results
from workers.errors import FerryError, HostUnavailableError, InvalidInputError
from workers.heartbeat import get_host, list_hosts
from workers.jobsignals import sender
from workers.jobsignals.protocol import OPS


class Connection:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or load()
        self.app = client_app(self.settings)
        self.redis = broker.connect(self.settings, socket_timeout=10)

    def host(self, name: str) -> dict[str, Any]:
        """The live record of host `name`, or a clear error."""
        try:
            rec = get_host(self.redis, name)
        except redis.RedisError as exc:
            raise HostUnavailableError(f"cannot reach the broker at {self.settings.broker_url}",
                                       cause=str(exc)) from exc
        if rec is None:
            raise HostUnavailableError(f"host '{name}' is not alive (no heartbeat in Redis)")
        return rec

    def hosts(self) -> list[dict[str, Any]]:
        try:
            return list_hosts(self.redis)
        except redis.RedisError as exc:
            raise HostUnavailableError(f"cannot reach the broker at {self.settings.broker_url}",
                                       cause=str(exc)) from exc

    def uuid_of(self, host: str, domain: str) -> str:
        return str(self.call(host, "dominfo", domain=domain)["uuid"])

    def signal(self, host: str, domain: str, op: str, **args: Any) -> Any:
        """Send job signal `op` for `domain` (known to `host`); the owner's answer."""
        if op not in OPS:
            raise InvalidInputError(f"unknown job signal '{op}' (one of {', '.join(OPS)})")
        uuid = self.uuid_of(host, domain)
        timeout = self.settings.signal_timeout_ms / 1000
        if op == "abort":
            return sender.abort(self.redis, uuid, timeout)
        return sender.send_signal(self.redis, uuid, op, args, timeout)

    def call(self, host: str, task: str, timeout: float | None = None, **kwargs: Any) -> Any:
        """Run `ferry.<task>` on `host` and return its result (or raise its error)."""
        self.host(host)
        wait = timeout or self.settings.task_timeout_s
        result = self.app.send_task(f"ferry.{task}", kwargs=kwargs, queue=queue_for(host))
        try:
            return results.wait(result, wait, propagate=True)
        except CeleryTimeout:
            raise HostUnavailableError(f"host '{host}' did not answer {task} within {wait:.0f}s",
                                       host=host) from None
        except FerryError:
            raise
        except Exception as exc:  # an error class this client cannot rebuild
            raise FerryError(str(exc) or type(exc).__name__, host=host) from exc
        finally:
            result.forget()

