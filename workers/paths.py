"""Which host paths a request may make ferry (or QEMU) open: FERRY_ALLOWED_DIRS.

A domain definition names files QEMU opens (disks, block devices, kernel and
initrd, firmware) and writes (serial logs, unix sockets, NVRAM); save, restore
and dump name image files ferry writes or reads.
Without a restriction any absolute path goes, as with libvirt's DAC driver
without SELinux.  With one, every such path must resolve (symlinks followed,
`..` gone) to somewhere inside one of the allowed directories, like Nova's
instances_path.  Images are checked once more on the opened file itself
(/proc/self/fd), so a symlink swapped in between the check and the open
cannot redirect the write.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from workers.domain import DomainDef
from workers.errors import InvalidInputError


class PathNotAllowedError(InvalidInputError):
    """A path a request names lies outside FERRY_ALLOWED_DIRS."""


def domain_paths(d: DomainDef) -> Iterator[tuple[str, str]]:
    """(what, path) for every host file the definition makes QEMU open."""
    for disk in d.disks:
        if disk.source:
            yield f"disk {disk.target}", disk.source
    for serial in d.serials:
        if serial.type in ("file", "unix") and serial.path:
            yield f"serial {serial.port} {serial.type}", serial.path
    for what in ("kernel", "initrd"):
        if getattr(d, what):
            yield f"os {what}", getattr(d, what)
    fw = d.firmware
    if fw is not None:
        yield "os loader", fw.loader
        for what, path in (("os nvram", fw.nvram), ("os nvram template", fw.template)):
            if path:
                yield what, path
    for c in d.channels:
        if c.path:
            yield f"channel {c.name}", c.path


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class AllowedDirs:
    """The allowed directories; empty means no restriction."""

    dirs: tuple[Path, ...] = ()

    @property
    def restricted(self) -> bool:
        return bool(self.dirs)

    def _roots(self) -> list[str]:
        return [os.path.realpath(d) for d in self.dirs]

    def allows(self, path: str | Path) -> bool:
        if not self.restricted:
            return True
        real = os.path.realpath(path)
        return any(_inside(real, root) for root in self._roots())

    def check(self, path: str | Path, what: str) -> None:
        if not self.allows(path):
            real = os.path.realpath(path)
            via = "" if str(real) == str(path) else f" (it resolves to {real})"
            raise PathNotAllowedError(
                f"{what} {path}{via} is outside the allowed directories "
                f"{':'.join(str(d) for d in self.dirs)} (FERRY_ALLOWED_DIRS)")

    def check_fd(self, fd: int, path: str | Path, what: str) -> None:
        """The file really opened as `fd` (whatever links led there) is allowed."""
        if not self.restricted:
            return
        real = os.readlink(f"/proc/self/fd/{fd}")
        if not self.allows(real):
            raise PathNotAllowedError(f"{what} {path} was opened as {real}, outside the allowed "
                                      f"directories (FERRY_ALLOWED_DIRS)")

    def check_domain(self, d: DomainDef) -> None:
        for what, path in domain_paths(d):
            self.check(path, what)
