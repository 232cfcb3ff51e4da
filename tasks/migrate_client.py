"""Managed migration from a caller's process: build the chain, return a handle at once.

The chain is made of signatures by task name, each routed to its host's
queue, so a service can build the same chain with `send_task`/`signature`
without importing ferry.  Task ids are `<job id>.<phase>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import chain
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from config import celery_app
from config.celery_app import queue_for
from tasks import results
from tasks.connection import Connection
from tasks.phase_tasks import PhaseTask
from workers.errors import FerryError, HostUnavailableError, InvalidInputError
from workers.migration.params import MigrationFlags as F
from workers.migration.params import MigrationParams

OPTION_FLAGS = {
    "live": F.LIVE, "p2p": F.PEER2PEER, "tunnelled": F.TUNNELLED,
    "persistent": F.PERSIST_DEST, "undefinesource": F.UNDEFINE_SOURCE, "suspend": F.PAUSED,
    "change_protection": F.CHANGE_PROTECTION, "offline": F.OFFLINE,
    "compressed": F.COMPRESSED, "abort_on_error": F.ABORT_ON_ERROR,
    "auto_converge": F.AUTO_CONVERGE, "postcopy": F.POSTCOPY, "unsafe": F.UNSAFE,
    "tls": F.TLS,
    "copy_storage_all": F.NON_SHARED_DISK, "copy_storage_inc": F.NON_SHARED_INC,
    "parallel": F.PARALLEL,
}
#: options that are parameters of their own (MigrationParams fields), not flags
OPTION_PARAMS = frozenset({
    "protocol", "xmlin", "migrate_uri", "bandwidth_mib_s", "max_downtime_ms", "timeout_s",
    "job_id", "migrate_disks", "disks_port", "parallel_connections", "comp_methods",
    "comp_xbzrle_cache", "comp_zstd_level", "comp_zlib_level"})


def params_from_options(domain: str, source: str, dest: str, **options: Any) -> MigrationParams:
    """virsh-like options (live=True, persistent=True, xml=..., ...) to MigrationParams."""
    flags = F(int(options.pop("flags", 0)))
    for name, flag in OPTION_FLAGS.items():
        if options.pop(name, False):
            flags |= flag
    unknown = set(options) - OPTION_PARAMS
    if unknown:
        raise InvalidInputError(f"unknown migration option(s): {', '.join(sorted(unknown))}")
    disks = options.get("migrate_disks")
    if isinstance(disks, str):  # "vda,vdb", as virsh takes it
        options["migrate_disks"] = tuple(t.strip() for t in disks.split(",") if t.strip())
    elif disks is None:
        options.pop("migrate_disks", None)
    elif isinstance(disks, list | tuple):
        options["migrate_disks"] = tuple(disks)
    return MigrationParams(domain=domain, source=source, dest=dest, flags=int(flags), **options)


def build_chain(p: MigrationParams, xml: str | None = None, app: Any = None) -> Any:
    """The managed chain; for peer-to-peer, the one task on the source queue."""
    src, dst = queue_for(p.source), queue_for(p.dest)
    app = celery_app.app if app is None else app

    def sig(name: PhaseTask, queue: str, *args: Any) -> Any:
        return app.signature(name.task_name, args=args, queue=queue,
                             task_id=name.task_id(p.job_id), immutable=False)

    if p.has(F.PEER2PEER):
        return sig(PhaseTask.MIGRATE_P2P, src, p.to_json())
    if p.protocol == 3:
        return chain(sig(PhaseTask.BEGIN3, src, p.to_json()), sig(PhaseTask.PREPARE3, dst),
                     sig(PhaseTask.PERFORM3, src), sig(PhaseTask.FINISH3, dst),
                     sig(PhaseTask.CONFIRM3, src))
    state = {"params": p.to_json(), "xml": xml}
    return chain(sig(PhaseTask.PREPARE2, dst, state), sig(PhaseTask.PERFORM2, src),
                 sig(PhaseTask.FINISH2, dst))


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
    src, dst = client.host(source), client.host(dest)
    if src["uuid"] == dst["uuid"]:
        raise InvalidInputError("attempt to migrate guest to the same host "
                                f"({source} and {dest} share uuid {src['uuid']})")


def dry_run(client: Connection, domain: str, source: str, dest: str,
            **options: Any) -> dict[str, Any]:
    """Begin's and Prepare's checks without starting anything (`--dry-run`): what a
    storage copy would copy, where, and how much; the first failing check raises."""
    p = params_from_options(domain, source, dest, **options)
    _check_hosts(client, source, dest)
    begin = client.call(source, "dryrun_begin", params=p.to_json())
    prep = client.call(dest, "dryrun_prepare", params=p.to_json(), xml=begin["xml"],
                       disks=begin["disks"])
    sources = begin.get("sources") or {}
    disks = [{**row, "source_path": sources.get(row["target"])} for row in prep["disks"]]
    return {"domain": domain, "source": source, "dest": dest, "flags": p.flag_names(),
            "result": "ok", "nbd": prep["nbd"], "disks": disks,
            "copy_bytes": prep["copy_bytes"]}


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
