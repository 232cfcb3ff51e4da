"""Managed migration from a caller's process: build the chain, return a handle at once.

The chain is made of signatures by task name, each routed to its host's
queue (tasks/migrate_plan.py), so a service can build the same chain with
`send_task`/`signature` without importing ferry.  Task ids are `<job id>.<phase>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import chain
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from config import celery_app
from tasks import results
from tasks.connection import Connection
from tasks.migrate_plan import (
    OPTION_FLAGS,
    OPTION_PARAMS,
    chain_steps,
    check_hosts,
    dry_run,
    params_from_options,
)
from workers.errors import FerryError, HostUnavailableError
from workers.migration.params import MigrationFlags as F
from workers.migration.params import MigrationParams

__all__ = ["OPTION_FLAGS", "OPTION_PARAMS", "MigrationJob", "build_chain", "dry_run", "migrate",
           "params_from_options"]


def build_chain(p: MigrationParams, xml: str | None = None, app: Any = None) -> Any:
    """The managed chain (tasks/migrate_plan.py's steps); for peer-to-peer, the one task
    on the source queue."""
    app = celery_app.app if app is None else app
    sigs = [app.signature(task.task_name, args=args, queue=queue,
                          task_id=task.task_id(p.job_id), immutable=False)
            for task, queue, args in chain_steps(p, xml)]
    return sigs[0] if len(sigs) == 1 else chain(*sigs)


@dataclass
class MigrationJob:
    """A handle on a running migration."""

    client: Connection
    params: MigrationParams
    result: AsyncResult

    @property
    def id(self) -> str:
        return self.params.job_id

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """The summary when the migration completed; raises its first error otherwise."""
        try:
            return dict(results.wait(self.result, timeout, propagate=True))
        except CeleryTimeout:
            raise HostUnavailableError(f"migration {self.id} did not end within {timeout}s") \
                from None
        except FerryError:
            raise
        except Exception as exc:
            raise FerryError(str(exc) or type(exc).__name__) from exc

    def info(self) -> dict[str, Any]:
        """domjobinfo as the source sees it."""
        return dict(self.client.call(self.params.source, "domjobinfo",
                                     domain=self.params.domain))

    def done(self) -> bool:
        return bool(self.result.ready())

    def _signal(self, op: str, **args: Any) -> Any:
        return self.client.signal(self.params.source, self.params.domain, op, **args)

    def abort(self) -> Any:
        return self._signal("abort")

    def set_speed(self, mib_s: int) -> Any:
        return self._signal("setspeed", bandwidth=mib_s)

    def get_speed(self) -> int:
        return int(self._signal("getspeed")["bandwidth"])

    def set_max_downtime(self, ms: int) -> Any:
        return self._signal("setmaxdowntime", downtime=ms)

    def suspend(self) -> Any:
        return self._signal("suspend")

    def postcopy(self) -> Any:
        return self._signal("postcopy")


def _check_hosts(client: Connection, source: str, dest: str) -> None:
    check_hosts(client.host(source), client.host(dest), source, dest)


def migrate(client: Connection, domain: str, source: str, dest: str,
            **options: Any) -> MigrationJob:
    p = params_from_options(domain, source, dest, **options)
    _check_hosts(client, source, dest)
    xml = None
    if p.protocol == 2 and not p.has(F.PEER2PEER):  # v2 has no Begin: the caller fetches
        # the XML, as libvirt's client does
        xml = client.call(source, "dumpxml", domain=domain, migratable=True)
    result = build_chain(p, xml, client.app).apply_async()
    return MigrationJob(client, p, result)
