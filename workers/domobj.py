"""A domain as the host agent tracks it: definitions, state, process, monitor."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from workers.dac import Claim
from workers.domain import DomainDef
from workers.domain_states import DomainState, PausedReason, Reason, RunningReason, ShutoffReason
from workers.domain_xml import format_domain_xml
from workers.errors import OperationInvalidError
from workers.jobs import ActiveJob
from workers.monitor import Monitor
from workers.process import QemuProcess


@dataclass
class DomainObj:
    """Mutated only on the agent's event loop thread."""

    definition: DomainDef | None  # persistent definition; None for a transient domain
    live: DomainDef | None = None  # the running definition while QEMU runs
    state: DomainState = DomainState.SHUTOFF
    reason: Reason = ShutoffReason.UNKNOWN
    proc: QemuProcess | None = None
    monitor: Monitor | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    # What the next STOP / RESUME event means, set by whoever causes it.
    expected_pause: PausedReason | None = None
    expected_resume: RunningReason | None = None
    # How the process exit is to be read, set by whoever causes it.
    exit_reason: ShutoffReason | None = None
    guest_shutdown: bool = False
    # The job this domain is in on this host, and the wait loop's wake-up call
    # (set by MIGRATION events and by the process exiting).
    job: ActiveJob | None = None
    migration_status: str | None = None
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # QEMU's time (epoch s) of the last STOP and RESUME events: the guest's pause.
    cpu_events: dict[str, float] = field(default_factory=dict)
    tunnel: Any = None
    tls_creds: str | None = None  # the id of this migration's tls-creds-x509 object
    log_offset: int = 0  # the size of the QEMU log when this QEMU started
    disk_claims: list[Claim] = field(default_factory=list)  # images its QEMU user holds
    # Unix sockets the worker bound for this QEMU (path, inode, ctime): gone with it, as
    # QEMU removes the ones it binds itself; only if still the same file (a dest on this
    # machine may have bound the path again).
    bound_sockets: list[tuple[str, int, int]] = field(default_factory=list)
    # Storage copy: the source's mirrors (workers.migration.storage.StorageCopy, which
    # gets the BLOCK_JOB_* events) and the dest's images and NBD server
    # (workers.migration.storage_dest.IncomingStorage).
    storage_out: Any = None
    storage_in: Any = None
    # Leases: held while the CPUs may run; released on pause with this lockstate.
    leases_held: bool = False
    lockstate: str | None = None  # the tunnel pump (workers.migration.tunnel) of a tunnelled job
    # Ports of the host's ranges held while QEMU runs: (range name, port).
    ports: list[tuple[str, int]] = field(default_factory=list)
    # The live definition's XML as the status file keeps it, for the `live` it was made
    # of (a DomainDef is frozen): status files are written several times per migration.
    live_xml: tuple[DomainDef, str] | None = field(default=None, repr=False)

    def live_status_xml(self) -> str:
        assert self.live is not None
        if self.live_xml is None or self.live_xml[0] is not self.live:
            self.live_xml = (self.live, format_domain_xml(self.live, live=True))
        return self.live_xml[1]

    @property
    def current(self) -> DomainDef:
        cur = self.live or self.definition
        assert cur is not None, "a domain has a live or a persistent definition"
        return cur

    @property
    def name(self) -> str:
        return self.current.name

    @property
    def uuid(self) -> str:
        return self.current.uuid

    @property
    def active(self) -> bool:
        return self.proc is not None

    async def gone_within(self, grace: float = 2.0) -> bool:
        """After a monitor error: whether QEMU is gone (its exit may be a moment behind
        the closed monitor, so a dead QEMU is reported as such, not as a QMP error)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exited.wait(), grace)
        return not self.active

    @property
    def persistent(self) -> bool:
        return self.definition is not None

    def require_active(self, op: str) -> None:
        if not self.active:
            raise OperationInvalidError(f"cannot {op}: domain '{self.name}' is not running")

    def require_inactive(self, op: str) -> None:
        if self.active:
            raise OperationInvalidError(f"cannot {op}: domain '{self.name}' is already active")

    def require_state(self, op: str, *states: DomainState) -> None:
        if self.state not in states:
            wanted = " or ".join(s.value for s in states)
            raise OperationInvalidError(
                f"cannot {op}: domain '{self.name}' is {self.state.value}, not {wanted}"
            )

    def require_no_job(self, op: str) -> None:
        if self.job is not None:
            raise OperationInvalidError(
                f"cannot {op}: domain '{self.name}' is in job {self.job.id} "
                f"({self.job.operation}, phase {self.job.phase})")

    def require_monitor(self, op: str) -> Monitor:
        self.require_active(op)
        if self.monitor is None:
            raise OperationInvalidError(
                f"cannot {op}: the monitor of '{self.name}' is not connected"
            )
        return self.monitor

    def info(self, host: str) -> dict[str, Any]:
        cur = self.current
        return {
            "name": cur.name,
            "uuid": cur.uuid,
            "host": host,
            "state": self.state.value,
            "reason": self.reason.value,
            "pid": self.proc.pid if self.proc else None,
            "memory_kib": cur.memory_kib,
            "current_memory_kib": cur.current_memory_kib or cur.memory_kib,
            "vcpus": cur.vcpus,
            "persistent": self.persistent,
        }
