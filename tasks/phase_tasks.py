"""The migration phase tasks by name: `ferry.<name>` on the queue of the host it runs on,
task id `<job id>.<name>` (a chain's tasks are found by the job id alone)."""

from __future__ import annotations

import enum


class PhaseTask(enum.StrEnum):
    BEGIN3 = "begin3"
    PREPARE3 = "prepare3"
    PERFORM3 = "perform3"
    FINISH3 = "finish3"
    CONFIRM3 = "confirm3"
    PREPARE2 = "prepare2"
    PERFORM2 = "perform2"
    FINISH2 = "finish2"
    MIGRATE_P2P = "migrate_p2p"

    @property
    def task_name(self) -> str:
        return f"ferry.{self.value}"

    def task_id(self, job_id: str) -> str:
        return f"{job_id}.{self.value}"


V3_CHAIN = (PhaseTask.BEGIN3, PhaseTask.PREPARE3, PhaseTask.PERFORM3, PhaseTask.FINISH3,
            PhaseTask.CONFIRM3)
ON_SOURCE = frozenset({PhaseTask.BEGIN3, PhaseTask.PERFORM3, PhaseTask.CONFIRM3,
                       PhaseTask.PERFORM2, PhaseTask.MIGRATE_P2P})
