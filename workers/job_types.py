"""What a job is and where it has got to: its operation and its phase, as enums.

Their values are the strings job records, status files, domjobinfo and task
results have always carried (a StrEnum is the string itself in JSON and Redis).
"""

from __future__ import annotations

import enum


class JobOperation(enum.StrEnum):
    """What a job does, as domjobinfo names it (libvirt's virDomainJobOperation)."""

    OUTGOING_MIGRATION = "outgoing_migration"
    INCOMING_MIGRATION = "incoming_migration"
    SAVE = "save"
    RESTORE = "restore"
    DUMP = "dump"

    @property
    def kind(self) -> str:
        """The job record's kind: 'migration' for both ends of one, else the operation."""
        migrations = (JobOperation.OUTGOING_MIGRATION, JobOperation.INCOMING_MIGRATION)
        return "migration" if self in migrations else self.value


class Phase(enum.StrEnum):
    """libvirt's migration phases (qemuMigrationJobPhase), and ferry's own below them."""

    NONE = "none"
    BEGIN3 = "begin3"
    PERFORM2 = "perform2"
    PERFORM3 = "perform3"
    PERFORM3_DONE = "perform3_done"
    CONFIRM3_CANCELLED = "confirm3_cancelled"
    CONFIRM3 = "confirm3"
    PREPARE = "prepare"
    FINISH2 = "finish2"
    FINISH3 = "finish3"
    QUEUED = "queued"  # waiting for a slot (workers/slots.py), before Begin
    # An image job has one phase, named as its operation.
    SAVE = "save"
    RESTORE = "restore"
    DUMP = "dump"


#: a job record in these phases is past the switch-over: an abort is too late
SWITCHED_OVER = frozenset({Phase.PERFORM3_DONE, Phase.FINISH2, Phase.FINISH3, Phase.CONFIRM3})
TOO_LATE = "too late to abort: the switch-over happened, the migration goes on to the dest"
