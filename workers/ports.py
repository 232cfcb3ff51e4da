"""Port ranges of a host (graphics autoport, incoming migration)."""

from __future__ import annotations

import socket
import threading

from workers.errors import QemuError


def bindable(address: str, port: int) -> bool:
    """Whether QEMU could listen on the port now. QEMU sets SO_REUSEADDR, so a port whose
    last connection lingers in TIME_WAIT (the dest closed first: every return-path
    migration) is free to it and must be free here too, or a busy host runs out of its
    range for a minute after each migration."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


class PortAllocator:
    """Hands out ports of a range that nobody listens on and we have not handed out."""

    def __init__(self, what: str, low: int, high: int) -> None:
        self.what, self.low, self.high = what, low, high
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def acquire(self, address: str) -> int:
        with self._lock:
            for port in range(self.low, self.high + 1):
                if port not in self._used and bindable(address, port):
                    self._used.add(port)
                    return port
        raise QemuError(f"no free {self.what} port in {self.low}-{self.high} on {address}")

    def peek(self, address: str) -> int | None:
        """A port `acquire` would hand out now, without taking it (a dry run)."""
        with self._lock:
            return next((port for port in range(self.low, self.high + 1)
                         if port not in self._used and bindable(address, port)), None)

    def reserve(self, port: int) -> None:
        """Mark a port in use by a guest found running after a restart."""
        with self._lock:
            self._used.add(port)

    def release(self, port: int) -> None:
        with self._lock:
            self._used.discard(port)
