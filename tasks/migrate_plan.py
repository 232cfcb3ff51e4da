"""A managed migration before it is sent: the caller's options checked into
MigrationParams, and the chain's steps (phase task, queue, arguments).

Free of Celery, and the one place both clients take a migration's options from:
tasks/migrate_client.py builds Celery's chain from `chain_steps`, the `ferry`
command (tasks/quick.py) the same first message by hand
(tests/unit/test_migrate_messages.py compares the two for every CLI option).
Task ids are `<job id>.<phase>`.
"""

from __future__ import annotations

from typing import Any, Protocol

from config.routing import queue_for
from tasks.phase_tasks import PhaseTask
from workers.errors import InvalidInputError
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

# (phase task, queue, positional arguments) in the order the chain runs them
Step = tuple[PhaseTask, str, tuple[Any, ...]]


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


def chain_steps(p: MigrationParams, xml: str | None = None) -> list[Step]:
    """The managed chain; for peer-to-peer, the one task on the source queue.  Only the
    first step has arguments: each later one gets the one before's result."""
    src, dst = queue_for(p.source), queue_for(p.dest)
    if p.has(F.PEER2PEER):
        return [(PhaseTask.MIGRATE_P2P, src, (p.to_json(),))]
    if p.protocol == 3:
        return [(PhaseTask.BEGIN3, src, (p.to_json(),)), (PhaseTask.PREPARE3, dst, ()),
                (PhaseTask.PERFORM3, src, ()), (PhaseTask.FINISH3, dst, ()),
                (PhaseTask.CONFIRM3, src, ())]
    state = {"params": p.to_json(), "xml": xml}
    return [(PhaseTask.PREPARE2, dst, (state,)), (PhaseTask.PERFORM2, src, ()),
            (PhaseTask.FINISH2, dst, ())]


def check_hosts(src: dict[str, Any], dst: dict[str, Any], source: str, dest: str) -> None:
    """Refuse a move between two names of one host (their records share a uuid)."""
    if src["uuid"] == dst["uuid"]:
        raise InvalidInputError("attempt to migrate guest to the same host "
                                f"({source} and {dest} share uuid {src['uuid']})")


class Caller(Protocol):
    """What dry_run asks of a client: Celery's (tasks/connection.py) or the command's."""

    def host(self, name: str) -> dict[str, Any]: ...

    def call(self, host: str, task: str, timeout: float | None = None,
             **kwargs: Any) -> Any: ...


def dry_run(client: Caller, domain: str, source: str, dest: str,
            **options: Any) -> dict[str, Any]:
    """Begin's and Prepare's checks without starting anything (`--dry-run`): what a
    storage copy would copy, where, and how much; the first failing check raises."""
    p = params_from_options(domain, source, dest, **options)
    check_hosts(client.host(source), client.host(dest), source, dest)
    begin = client.call(source, "dryrun_begin", params=p.to_json())
    prep = client.call(dest, "dryrun_prepare", params=p.to_json(), xml=begin["xml"],
                       disks=begin["disks"])
    sources = begin.get("sources") or {}
    disks = [{**row, "source_path": sources.get(row["target"])} for row in prep["disks"]]
    return {"domain": domain, "source": source, "dest": dest, "flags": p.flag_names(),
            "result": "ok", "nbd": prep["nbd"], "disks": disks,
            "copy_bytes": prep["copy_bytes"], "nvram": prep.get("nvram")}
