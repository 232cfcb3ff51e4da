"""A loopback packet capture in a process of its own, for tests that look at what
crossed the wire (e.g. that a TLS migration stream holds none of the guest's bytes).

    python -m scripts.testbed.capture --ports 49152-49215 --out DIR

An AF_PACKET socket on `lo` (root; no tcpdump needed) takes every TCP segment
of the connections made *to* a port of the range while it runs (the SYN says
which end listens: a client whose ephemeral port falls in the range by chance,
e.g. a Redis connection, is not a migration stream), until SIGTERM; then it drains what the kernel
still holds (reads until the socket's queue is empty: stopping on the signal
alone loses what is queued), reassembles each direction of each connection by
sequence number and writes DIR/SPORT-DPORT.bin per direction and
DIR/stats.json (packets and drops as the kernel counts them, truncated
frames, flows).  It runs in its own process because a Python capture is
CPU-bound: in the test process it would slow the migration it watches (and
the GIL would make it miss packets).  On lo every frame is seen twice (out
and in): the outgoing copy is skipped.  DIR/ready appears once the socket is
bound, so a test knows from when on it sees everything.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33
DRAIN_S = 0.5
FRAME = 262144

Segment = tuple[int, bytes]  # (sequence number, payload)


def parse_frame(frame: bytes, low: int, high: int) -> tuple[tuple[int, int], int, bytes] | None:
    """((sport, dport), seq, payload) of an Ethernet/IPv4/TCP frame with a port in
    [low, high] and a payload; None for anything else."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 15) * 4
    if ip[0] >> 4 != 4 or ip[9] != 6:
        return None
    total = struct.unpack("!H", ip[2:4])[0]
    tcp = ip[ihl:total]
    if len(tcp) < 20:
        return None
    sport, dport, seq = struct.unpack("!HHI", tcp[:8])
    if not (low <= sport <= high or low <= dport <= high):
        return None
    payload = tcp[(tcp[12] >> 4) * 4:]
    return ((sport, dport), seq, bytes(payload)) if payload else None


def connect_to(frame: bytes, low: int, high: int) -> tuple[int, int] | None:
    """(client port, server port) of a SYN (a connection being opened) to a port in
    [low, high]; None for anything else."""
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[14] >> 4 != 4 or frame[23] != 6:
        return None
    tcp = frame[14 + (frame[14] & 15) * 4:]
    sport, dport = struct.unpack("!HH", tcp[:4])
    syn_only = tcp[13] & 0x12 == 0x02
    return (sport, dport) if syn_only and low <= dport <= high else None


def reassemble(segments: Iterable[Segment]) -> bytes:
    """One direction's bytes from its segments, in sequence order (sequence numbers
    taken relative to the first one, so a wrap at 2**32 is harmless; retransmitted
    or overlapping bytes are written once)."""
    segs = list(segments)
    if not segs:
        return b""
    base = segs[0][0]
    placed = sorted(((seq - base) % (1 << 32), data) for seq, data in segs)
    out = bytearray()
    for offset, data in placed:
        if offset + len(data) <= len(out):
            continue
        out += data[len(out) - offset:] if offset < len(out) else data
    return bytes(out)


CIPHER_SUITES = {0x1301: "TLS_AES_128_GCM_SHA256", 0x1302: "TLS_AES_256_GCM_SHA384",
                 0x1303: "TLS_CHACHA20_POLY1305_SHA256",
                 0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
                 0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
                 0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                 0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"}
_VERSIONS = {0x0303: "TLS 1.2", 0x0304: "TLS 1.3"}


def server_hello(stream: bytes) -> tuple[str, str] | None:
    """(version, cipher suite) from the ServerHello a server's stream starts with (sent
    in the clear, also in TLS 1.3); None if the stream does not start with one."""
    if len(stream) < 9 or stream[0] != 0x16 or stream[5] != 0x02:
        return None
    body = stream[9:]  # record header (5) + handshake header (4)
    pos = 2 + 32  # legacy_version, random
    pos += 1 + body[pos]  # session id
    suite = int.from_bytes(body[pos:pos + 2], "big")
    pos += 2 + 1  # cipher suite, compression
    version = int.from_bytes(body[:2], "big")
    ext_end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
    pos += 2
    while pos + 4 <= min(ext_end, len(body)):
        kind, size = int.from_bytes(body[pos:pos + 2], "big"), \
            int.from_bytes(body[pos + 2:pos + 4], "big")
        if kind == 0x002B and size == 2:  # supported_versions: the real version
            version = int.from_bytes(body[pos + 4:pos + 6], "big")
        pos += 4 + size
    return (_VERSIONS.get(version, hex(version)), CIPHER_SUITES.get(suite, hex(suite)))


class Capture:
    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
        self.sock.bind(("lo", 0))
        self.flows: dict[tuple[int, int], list[Segment]] = {}
        self.opened: set[tuple[int, int]] = set()  # (client, server) of SYNs into the range
        self.truncated = 0
        self.stopping = False

    def run(self) -> None:
        buf = bytearray(FRAME)
        self.sock.settimeout(DRAIN_S)
        while True:
            if self.stopping:
                self.sock.setblocking(False)  # drain what the kernel queued, then stop
            try:
                n, addr = self.sock.recvfrom_into(buf, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                return  # the queue is empty: everything sent before the stop is read
            except TimeoutError:
                continue
            if n > FRAME:
                self.truncated += 1
                continue
            if addr[2] == PACKET_OUTGOING:
                continue
            frame = bytes(buf[:n])
            got = parse_frame(frame, self.low, self.high)
            if got is not None:
                self.flows.setdefault(got[0], []).append((got[1], got[2]))
            elif (opened := connect_to(frame, self.low, self.high)) is not None:
                self.opened.add(opened)

    def write(self, out: Path) -> None:
        packets, drops = struct.unpack("II", self.sock.getsockopt(SOL_PACKET,
                                                                  PACKET_STATISTICS, 8))
        flows = {}
        for (sport, dport), segs in self.flows.items():
            if (sport, dport) not in self.opened and (dport, sport) not in self.opened:
                continue  # not a connection to the range made while capturing
            data = reassemble(segs)
            (out / f"{sport}-{dport}.bin").write_bytes(data)
            flows[f"{sport}-{dport}"] = len(data)
        stats = {"packets": packets, "drops": drops, "truncated": self.truncated,
                 "flows": flows}
        (out / "stats.json").write_text(json.dumps(stats))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ports", required=True, help="LOW-HIGH")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    low, _, high = a.ports.partition("-")
    cap = Capture(int(low), int(high or low))

    def stop(signum: int, frame: object) -> None:
        cap.stopping = True

    signal.signal(signal.SIGTERM, stop)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ready").touch()
    cap.run()
    cap.write(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
