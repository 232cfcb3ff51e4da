"""ferry's error hierarchy: one root, a few kinds an operator can act on.

    FerryError
    ├── InvalidInputError        bad XML, bad argument: nothing was changed
    │   └── UnsupportedError     valid, but outside what ferry supports
    ├── NotFoundError            no such domain, no such host
    ├── OperationInvalidError    the domain is not in a state that allows this
    ├── HostUnavailableError     a host does not answer (no heartbeat, timeout)
    ├── QemuError                QEMU failed to start or a monitor command failed
    └── MigrationError           a migration phase failed (later issues)

Every error carries the phase and the host where it happened and the cause;
`str(err)` is the line the operator sees.  The constructor's arguments are
all positional and all JSON-able so Celery can rebuild the exception on the
client side from its JSON result (it calls ``cls(*args)``).
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


class UnsupportedError(InvalidInputError):
    """The request is well formed but asks for something ferry does not support."""


class NotFoundError(FerryError):
    """No such domain or host."""


class OperationInvalidError(FerryError):
    """The domain's state does not allow the operation."""


class HostUnavailableError(FerryError):
    """A host is not alive or did not answer in time."""


class QemuError(FerryError):
    """QEMU could not be started or refused a monitor command."""


class MigrationError(FerryError):
    """A migration phase failed."""
