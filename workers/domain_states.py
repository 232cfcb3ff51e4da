"""A domain's run state and its reason (running:booted, paused:migration, ...), named as
libvirt names them.  (A migration job's state is workers/migration/chain_state.py.)"""

from __future__ import annotations

import enum


class DomainState(enum.StrEnum):
    NOSTATE = "nostate"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"


class RunningReason(enum.StrEnum):
    UNKNOWN = "unknown"
    BOOTED = "booted"
    MIGRATED = "migrated"
    RESTORED = "restored"
    UNPAUSED = "unpaused"
    MIGRATION_CANCELED = "migration_canceled"
    SAVE_CANCELED = "save_canceled"


class PausedReason(enum.StrEnum):
    UNKNOWN = "unknown"
    USER = "user"
    MIGRATION = "migration"
    SAVE = "save"
    DUMP = "dump"
    IOERROR = "ioerror"
    SHUTTING_DOWN = "shutting_down"
    POSTCOPY = "postcopy"
    STARTING_UP = "starting_up"


class ShutoffReason(enum.StrEnum):
    UNKNOWN = "unknown"
    SHUTDOWN = "shutdown"
    DESTROYED = "destroyed"
    CRASHED = "crashed"
    MIGRATED = "migrated"
    SAVED = "saved"
    FAILED = "failed"


class CrashedReason(enum.StrEnum):
    UNKNOWN = "unknown"
    PANICKED = "panicked"


Reason = RunningReason | PausedReason | ShutoffReason | CrashedReason

_REASONS: dict[DomainState, type[enum.StrEnum]] = {
    DomainState.RUNNING: RunningReason,
    DomainState.PAUSED: PausedReason,
    DomainState.SHUTOFF: ShutoffReason,
    DomainState.CRASHED: CrashedReason,
}


def parse_reason(state: DomainState, reason: str) -> Reason:
    """The reason enum member for `reason` under `state` (unknown if not one)."""
    enum_cls = _REASONS.get(state)
    if enum_cls is None:
        return ShutoffReason.UNKNOWN
    try:
        return enum_cls(reason)  # type: ignore[return-value]
    except ValueError:
        return enum_cls("unknown")  # type: ignore[return-value]
