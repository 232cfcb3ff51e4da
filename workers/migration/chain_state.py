"""A migration job's state, what travels down its chain: parameters, cookie, URI, and the
first error.  (A domain's run state is workers/domain_states.py.)

Each phase task takes the state the previous phase returned and returns the
next one, so a failed phase never stops the chain: the phases after it run
in their cancelled form, and the last one raises the FIRST error.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from workers import errors
from workers.errors import FerryError, InvalidInputError, MigrationError
from workers.job_types import Phase
from workers.migration.params import MigrationParams


@dataclass(frozen=True)
class PhaseRecord:
    phase: Phase
    host: str
    elapsed_ms: float
    ok: bool
    cancelled: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PhaseRecord:
        rec = cls(**data)  # TypeError: a field missing or unknown
        return replace(rec, phase=Phase(rec.phase))  # ValueError: no such phase


@dataclass(frozen=True)
class MigrationState:
    params: MigrationParams
    xml: str | None = None  # the domain definition that goes to the dest
    cookie: str | None = None  # the cookie out of the previous phase
    uri: str | None = None  # the QEMU migration URI prepare returned
    source_paused_by_us: bool = False  # confirm cancelled resumes only what we paused
    was_running: bool = True  # the run state to restore on the dest
    outcome_unknown: bool = False  # Finish may have started the dest: never resume here
    source_cpu: str | None = None  # the source host's CPU, for a host-passthrough guest
    error: dict[str, Any] | None = None  # the first error; never overwritten
    cleanup_errors: tuple[dict[str, Any], ...] = ()
    phases: tuple[PhaseRecord, ...] = ()
    statistics: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def with_error(self, exc: FerryError) -> MigrationState:
        """The first error wins; later ones are kept as clean-up errors."""
        if self.error is None:
            return replace(self, error=exc.to_dict())
        return replace(self, cleanup_errors=(*self.cleanup_errors, exc.to_dict()))

    def with_phase(self, phase: Phase, host: str, started: float, ok: bool,
                   cancelled: bool = False) -> MigrationState:
        rec = PhaseRecord(phase, host, round((time.monotonic() - started) * 1000, 1), ok,
                          cancelled)
        return replace(self, phases=(*self.phases, rec))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["params"] = self.params.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any) -> MigrationState:
        """A state from a task message (anyone can send one): wrong shapes are clear errors."""
        _check_shape(data)
        data = dict(data)
        data["params"] = MigrationParams.from_json(data["params"])
        try:
            data["phases"] = tuple(PhaseRecord.from_json(p) for p in data.get("phases", ()))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"migration state: bad phase record: {exc}") from None
        data["cleanup_errors"] = tuple(data.get("cleanup_errors", ()))
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "xml": (str, type(None)), "cookie": (str, type(None)), "uri": (str, type(None)),
    "source_paused_by_us": (bool,), "was_running": (bool,), "outcome_unknown": (bool,),
    "source_cpu": (str, type(None)),
    "error": (dict, type(None)), "cleanup_errors": (list, tuple), "phases": (list, tuple),
    "statistics": (dict,), "result": (dict, type(None)),
}


def _check_shape(data: Any) -> None:
    if not isinstance(data, dict):
        raise InvalidInputError("migration state must be a JSON object")
    if "params" not in data:
        raise InvalidInputError("migration state lacks params")
    for key, kinds in _STATE_TYPES.items():
        if key in data and not isinstance(data[key], kinds):
            raise InvalidInputError(f"migration state '{key}' has the wrong type "
                                    f"({type(data[key]).__name__})")
    for key in ("phases", "cleanup_errors"):
        if not all(isinstance(p, dict) for p in data.get(key, ())):
            raise InvalidInputError(f"migration state '{key}' must be JSON objects")


def rebuild_error(info: dict[str, Any]) -> FerryError:
    """The FerryError an error dict describes, with its original class when known."""
    cls = getattr(errors, str(info.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, FerryError)):
        cls = MigrationError
    text = str(info.get("text") or info.get("message") or "migration failed")
    return cls(text, info.get("phase"), info.get("host"), info.get("cause"))
