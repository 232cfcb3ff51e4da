"""The way an image's stream goes between QEMU and its file, for save, restore and dump
(the jobs are workers/image_jobs.py, the file format workers/image_format.py):

- TempImage: the temp file (mode 0600, in the target's directory) an image
  or dump is written to, fsynced and renamed over the target once complete;
- Helper: a compressor, decompressor or dd that ferry spawns itself (an
  argument list, never a shell), in its own session, its stderr kept in a
  memfd for the one-line error;
- pipeline(): helpers chained by pipes between QEMU and the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import stat
import uuid as uuidlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from workers.domain import DomainDef
from workers.errors import InvalidInputError, UnsupportedError
from workers.image_format import CompressorError, ImageIOError
from workers.paths import AllowedDirs

log = logging.getLogger(__name__)
T = TypeVar("T")

PIPE_SIZE = 1 << 20
HELPER_GRACE_S = 2.0  # how long a failing helper gets to exit and say why


def io_call(what: str, fn: Callable[..., T], *args: Any) -> T:
    """An OS call whose failure is one clear line naming what was being done."""
    try:
        return fn(*args)
    except OSError as exc:
        raise ImageIOError(f"{what}: {exc.strerror or exc}") from exc


def target_path(path: str, allowed: AllowedDirs) -> Path:
    """Where an image or dump goes: absolute, in an existing directory, not a directory
    nor a device, resolved (a symlink leads to the file it names, which is what gets
    replaced) and inside the allowed directories."""
    p = Path(path)
    if not p.is_absolute():
        raise InvalidInputError(f"the file path must be absolute: {path}")
    if p.is_dir():
        raise InvalidInputError(f"{path} is a directory")
    allowed.check(p, "image path")
    real = Path(os.path.realpath(p))
    if real.exists() and not real.is_file():
        raise InvalidInputError(f"{path} is not a regular file")
    if not real.parent.is_dir():
        raise InvalidInputError(f"directory {p.parent} does not exist")
    return real


def open_image(path: str, allowed: AllowedDirs) -> int:
    """An existing image opened for reading: a regular file inside the allowed directories
    (checked on the path, then on the file really opened), never through a last symlink."""
    p = Path(path)
    if not p.is_absolute():
        raise InvalidInputError(f"the file path must be absolute: {path}")
    allowed.check(p, "image path")
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = io_call(f"cannot open {path}", os.open, os.path.realpath(p), flags)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise InvalidInputError(f"{path} is a directory")
        if not stat.S_ISREG(mode):
            raise InvalidInputError(f"{path} is not a regular file")
        allowed.check_fd(fd, path, "image path")
    except BaseException:
        os.close(fd)
        raise
    return fd


def not_a_disk(d: DomainDef, target: Path) -> None:
    """An image renamed over one of the guest's own disks would destroy it."""
    real = os.path.realpath(target)
    for disk in d.disks:
        if disk.source and os.path.realpath(disk.source) == real:
            raise InvalidInputError(f"{target} is disk {disk.target} of domain '{d.name}'")


class TempImage:
    """The temp file (mode 0600, same directory) an image is written to, renamed when done."""

    def __init__(self, target: Path, allowed: AllowedDirs) -> None:
        self.target = target
        self.tmp = target.with_name(f".{target.name}.ferry-{uuidlib.uuid4().hex[:8]}.part")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        self.fd = io_call(f"cannot create {self.tmp}", os.open, self.tmp, flags, 0o600)
        try:  # a directory swapped for a symlink since target_path() is caught here
            allowed.check_fd(self.fd, target, "image path")
        except BaseException:
            self.discard()
            raise
        os.fchmod(self.fd, 0o600)  # whatever the umask

    def write(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = io_call(f"cannot write {self.tmp}", os.pwrite, self.fd, view, offset)
            view, offset = view[n:], offset + n

    def writer_fd(self, offset: int) -> int:
        """A separate open file (own offset and flags: dd sets O_DIRECT on it) at `offset`."""
        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = io_call(f"cannot open {self.tmp}", os.open, self.tmp, flags)
        os.lseek(fd, offset, os.SEEK_SET)
        return fd

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    async def commit(self) -> None:
        """fsync, rename over the target, fsync the directory: complete or absent."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, io_call, f"cannot write {self.tmp}", os.fsync, self.fd)
        io_call(f"cannot rename to {self.target}", os.replace, self.tmp, self.target)
        self.close()
        dfd = os.open(self.target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            await loop.run_in_executor(None, os.fsync, dfd)
        finally:
            os.close(dfd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


# -- helper processes (compressors, dd) ----------------------------------------------------
class Helper:
    """A compressor, decompressor or dd ferry started; stderr kept for the error line."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, err_fd: int):
        self.name, self.proc, self._err_fd = name, proc, err_fd
        self.stderr = ""

    @classmethod
    async def spawn(cls, name: str, argv: Sequence[str], stdin: int, stdout: int) -> Helper:
        err_fd = os.memfd_create("ferry-helper-stderr", os.MFD_CLOEXEC)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=stdin, stdout=stdout, stderr=err_fd, start_new_session=True)
        except OSError as exc:
            os.close(err_fd)
            raise CompressorError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        log.info("started %s pid %d: %s", name, proc.pid, " ".join(argv))
        return cls(name, proc, err_fd)

    @property
    def failed(self) -> bool:
        return self.proc.returncode not in (None, 0)

    @property
    def broken_pipe(self) -> bool:
        """Killed by SIGPIPE: the other end went away first (a consequence, not a cause)."""
        return self.proc.returncode == -13

    async def wait(self, timeout: float | None = None) -> bool:
        """Until it exits (True) or `timeout` passes (False); reads its stderr once gone."""
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return False
        if self._err_fd >= 0:
            data = os.pread(self._err_fd, 4096, max(0, os.fstat(self._err_fd).st_size - 4096))
            self.stderr = " | ".join(ln.strip() for ln in
                                     data.decode(errors="replace").splitlines() if ln.strip())
            os.close(self._err_fd)
            self._err_fd = -1
        return True

    def error(self) -> CompressorError:
        rc = self.proc.returncode
        how = f"exit status {rc}" if rc is None or rc >= 0 else f"killed by signal {-rc}"
        return CompressorError(f"{self.name} failed ({how})", cause=self.stderr or None)

    async def finish(self) -> None:
        await self.wait()
        if self.failed:
            raise self.error()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.wait()


async def pipeline(stages: Sequence[Sequence[str]], file_fd: int, *,
                   writing: bool) -> tuple[int, list[Helper]]:
    """Spawn `stages` between QEMU and `file_fd`; the fd QEMU gets and the helpers.

    Writing, data flows QEMU -> stages[0] -> ... -> file; reading, file ->
    stages[0] -> ... -> QEMU.  No stage: QEMU gets (a dup of) the file itself.
    """
    helpers: list[Helper] = []
    end = os.dup(file_fd)
    try:
        for argv in (reversed(stages) if writing else stages):
            r, w = os.pipe2(os.O_CLOEXEC)
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            # the helper's stdin and stdout; the pipe end kept for the next stage or QEMU
            stdin, stdout, keep = (r, end, w) if writing else (end, w, r)
            role = "" if argv[0] == "dd" else ("compressor " if writing else "decompressor ")
            try:
                helpers.append(await Helper.spawn(role + argv[0], argv, stdin, stdout))
            finally:
                os.close(stdin)
                os.close(stdout)
                end = keep
    except BaseException:
        os.close(end)
        for h in helpers:
            await h.kill()
        raise
    return end, helpers


def require_programs(stages: Sequence[Sequence[str]]) -> None:
    for argv in stages:
        if shutil.which(argv[0]) is None:
            raise UnsupportedError(f"{argv[0]} is not installed on this host")


async def explain(helpers: Sequence[Helper], exc: BaseException) -> BaseException:
    """A helper's own failure explains the error better than what QEMU saw of it."""
    for h in helpers:
        await h.wait(HELPER_GRACE_S)
    causes = [h for h in helpers if h.failed and not h.broken_pipe]
    return causes[0].error() if causes else exc
