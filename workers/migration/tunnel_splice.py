"""Zero-copy moves for the tunnel: splice(2) through a pipe between QEMU's socket and the
broker's, so the stream's bytes never enter the worker's memory.

The receiver reads each popped element's RESP header, then the kernel moves
the element's pages from the broker's TCP socket into a pipe and from the
pipe into QEMU's socket.  That needs a plain socket to the broker: with TLS
(rediss://) the pumps use the copying path of tunnel_wire.py.  Measured
without QEMU (scripts/bench/tunnel_micro.py): the receiver's CPU per GiB
0.22-0.29 s against 0.45-0.60 copying.  The sender copies: splicing into the
broker's socket saved it ~0.1 s per GiB and cost Redis as much again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import ssl
import struct

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named from Python 3.10 on some builds only
F_GETPIPE_SZ = 1032
PIPE_SIZE = 1 << 20  # /proc/sys/fs/pipe-max-size's default: what anyone may ask for
KERNEL_TIMEOUT_S = 10  # a blocking broker socket still gives up, as redis-py's would


def available(*socks: socket.socket) -> bool:
    """Whether every socket can splice: a plain kernel socket, on Linux."""
    return hasattr(os, "splice") and not any(isinstance(s, ssl.SSLSocket) for s in socks)


def make_blocking(sock: socket.socket) -> None:
    """A broker socket that splice can wait on: blocking, with the kernel's own timeouts
    (redis-py's timeout is poll() in user space, which a splice does not go through)."""
    sock.settimeout(None)
    tv = struct.pack("ll", KERNEL_TIMEOUT_S, 0)
    for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        sock.setsockopt(socket.SOL_SOCKET, opt, tv)


class Pipe:
    """A pipe as a bounded buffer in the kernel: what is in it is on its way."""

    def __init__(self, size: int = PIPE_SIZE) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe-max-size: keep the default
            fcntl.fcntl(self.w, F_SETPIPE_SZ, size)
        self.size = fcntl.fcntl(self.w, F_GETPIPE_SZ)

    def drain(self, dst: int, n: int, more: bool = False) -> None:
        """The first `n` bytes of the pipe into `dst` (SPLICE_F_MORE: more follows)."""
        flags = os.SPLICE_F_MORE if more else 0
        while n:
            n -= os.splice(self.r, dst, n, flags=flags)

    def move(self, src: int, dst: int, n: int) -> None:
        """Exactly `n` bytes from `src` to `dst`, through the pipe a pipe-full at a time:
        the pipe fills before it drains, so QEMU's socket gets big pieces (small ones cost
        QEMU more per byte to read)."""
        while n:
            want = min(n, self.size)
            got = 0
            while got < want:
                m = os.splice(src, self.w, want - got)
                if m == 0:
                    raise ConnectionError("the broker closed the connection")
                got += m
            self.drain(dst, got)
            n -= got

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)
