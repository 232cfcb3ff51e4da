"""The loopback capture's frame parsing and stream reassembly, on synthetic frames."""

from __future__ import annotations

import struct

from scripts.testbed.capture import parse_frame, reassemble


def frame(sport: int, dport: int, seq: int, payload: bytes, proto: int = 6) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x18, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0, 64, proto,
                     0, b"\x7f\0\0\1", b"\x7f\0\0\1")
    return b"\0" * 12 + b"\x08\x00" + ip + tcp + payload + b"\0\0"  # (lo pads nothing;
    # the IP total length bounds the payload either way)


def test_a_tcp_frame_on_a_watched_port_gives_its_flow_sequence_and_payload() -> None:
    assert parse_frame(frame(50000, 40001, 7, b"abc"), 40000, 40063) == \
        ((50000, 40001), 7, b"abc")
    assert parse_frame(frame(40001, 50000, 9, b"x"), 40000, 40063) == ((40001, 50000), 9, b"x")


def test_other_ports_other_protocols_and_empty_segments_are_skipped() -> None:
    assert parse_frame(frame(50000, 6379, 1, b"abc"), 40000, 40063) is None
    assert parse_frame(frame(50000, 40001, 1, b"abc", proto=17), 40000, 40063) is None
    assert parse_frame(frame(50000, 40001, 1, b""), 40000, 40063) is None
    assert parse_frame(b"\0" * 12 + b"\x86\xdd" + b"\0" * 60, 40000, 40063) is None


def test_segments_are_put_in_sequence_order_once_across_a_wrap() -> None:
    base = (1 << 32) - 3
    segs = [(base, b"abc"), ((base + 6) % (1 << 32), b"ghi"), ((base + 3) % (1 << 32), b"def"),
            ((base + 3) % (1 << 32), b"def"), ((base + 4) % (1 << 32), b"efgh")]
    assert reassemble(segs) == b"abcdefghi"
    assert reassemble([]) == b""
