"""The root of ferry's errors, and the one error the settings raise.

They live at config's level because `config/` raises them (a bad FERRY_*
setting is an InvalidInputError); the rest of the hierarchy, and the one
name everything else imports them by, is workers/errors.py.
"""

from __future__ import annotations


class FerryError(Exception):
    """Root of every error ferry raises on purpose."""

    def __init__(
        self,
        message: str,
        phase: str | None = None,
        host: str | None = None,
        cause: str | None = None,
    ) -> None:
        super().__init__(message, phase, host, cause)
        self.message = message
        self.phase = phase
        self.host = host
        self.cause = cause

    def __str__(self) -> str:
        where = []
        if self.phase:
            where.append(f"phase {self.phase}")
        if self.host:
            where.append(f"host {self.host}")
        prefix = f"{', '.join(where)}: " if where else ""
        tail = f" ({self.cause})" if self.cause and self.cause not in self.message else ""
        return f"{prefix}{self.message}{tail}"

    def at(self, *, phase: str | None = None, host: str | None = None) -> FerryError:
        """Fill in where the error happened, keeping what is already known."""
        self.phase = self.phase or phase
        self.host = self.host or host
        self.args = (self.message, self.phase, self.host, self.cause)
        return self

    def to_dict(self) -> dict[str, str | None]:
        """JSON for job records and chain state; `message` is what the operator reads."""
        return {
            "type": type(self).__name__,
            "message": str(self),
            "text": self.message,
            "phase": self.phase,
            "host": self.host,
            "cause": self.cause,
        }


class InvalidInputError(FerryError):
    """The request is malformed; nothing was changed."""
