"""`python -m scripts.testbed.mountns --bind SRC:DST ... -- CMD ...`: run CMD with SRC
mounted on DST in a mount namespace of its own, as separate machines see one path.

The test fleet starts each host's worker through this (inside `ip netns exec`, which
execs: the pid stays the worker's), so a host's QEMUs open that host's files under a
path every host names alike: a guest's disk at the same path holds different files on
each host, as with local disks on separate machines.  Mounts are made private first,
so nothing leaks into the parent's namespace.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
from collections.abc import Sequence

CLONE_NEWNS = 0x00020000


def unshare_mounts() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.testbed.mountns")
    p.add_argument("--bind", action="append", default=[], metavar="SRC:DST")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command to run")
    unshare_mounts()
    for pair in args.bind:
        src, sep, dst = pair.partition(":")
        if not sep or not os.path.isabs(src) or not os.path.isabs(dst):
            p.error(f"--bind needs SRC:DST, absolute paths: {pair!r}")
        subprocess.run(["mount", "--bind", src, dst], check=True)
    os.execvp(cmd[0], cmd)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
