"""Storage copy tasks outside a migration chain: the dry run's two halves (`ferry migrate
--copy-storage-all --dry-run`), Begin's checks on the source and Prepare's on the dest,
which start nothing."""

from __future__ import annotations

from typing import Any

from tasks.checked import task
from workers.agent import get_agent
from workers.errors import FerryError, InvalidInputError
from workers.migration import storage, storage_dest
from workers.migration.cookie import CookieNbd, CookieNbdDisk
from workers.migration.params import MigrationParams


@task("dryrun_begin")
def dryrun_begin(params: dict[str, Any]) -> dict[str, Any]:
    """On the source: the definition the dest would get and the disks it would receive."""
    agent = get_agent()
    p = MigrationParams.from_json(params)
    try:
        return agent.call(storage.dry_run(agent, p))
    except FerryError as exc:
        raise exc.at(phase="begin3", host=agent.host) from None


@task("dryrun_prepare")
def dryrun_prepare(params: dict[str, Any], xml: str, disks: list[Any]) -> dict[str, Any]:
    """On the dest: Prepare's checks of those disks; what it would create, and where."""
    agent = get_agent()
    p = MigrationParams.from_json(params)
    try:
        nbd = CookieNbd(0, tuple(CookieNbdDisk(**d) for d in disks))
    except TypeError as exc:
        raise InvalidInputError(f"dry run: bad disk description: {exc}") from None
    try:
        d = agent.parse(xml)
        return agent.call(storage_dest.dry_run(agent, d, nbd, p))
    except FerryError as exc:
        raise exc.at(phase="prepare", host=agent.host) from None
