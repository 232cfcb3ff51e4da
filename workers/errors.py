"""ferry's error hierarchy: one root, a few kinds an operator can act on.

    FerryError
    ├── InvalidInputError        bad XML, bad argument: nothing was changed
    │   └── UnsupportedError     valid, but outside what ferry supports
    ├── NotFoundError            no such domain, no such host
    ├── OperationInvalidError    the domain is not in a state that allows this
    ├── HostUnavailableError     a host does not answer (no heartbeat, timeout)
    ├── QemuError                QEMU failed to start or a monitor command failed
    └── MigrationError           a migration phase failed
        └── TlsError             migration TLS: material missing or invalid, or the
                                 peer refused the handshake

Every error carries the phase and the host where it happened and the cause;
`str(err)` is the line the operator sees.  The constructor's arguments are
all positional and all JSON-able so Celery can rebuild the exception on the
client side from its JSON result (it calls ``cls(*args)``).

FerryError and InvalidInputError are defined in config/errors.py, because
`config/` raises them; this module is the one to import every error from.
"""

from __future__ import annotations

import re

from config.errors import FerryError, InvalidInputError

__all__ = [
    "FerryError", "HostUnavailableError", "InvalidInputError", "MigrationError", "NotFoundError",
    "OperationInvalidError", "QemuError", "TlsError", "UnsupportedError", "one_line",
]
_LONG_WORD = re.compile(r"\S{129,}")
MAX_MESSAGE = 600


def one_line(text: str) -> str:
    """A message about untrusted input, for the operator: one line, bounded.

    Words over 128 characters are cut and the whole at MAX_MESSAGE: input
    quoted back (a 5,000-digit name, a tag libxml2 echoes) would otherwise
    flood the line.
    """
    text = _LONG_WORD.sub(lambda m: m[0][:128] + "...", " ".join(text.split()))
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 4] + " ..."


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


class TlsError(MigrationError):
    """Migration TLS failed: a host's certificates or keys, or the peer's handshake."""
