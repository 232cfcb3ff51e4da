"""The loopback capture's frame parsing and stream reassembly, on synthetic frames."""

from __future__ import annotations

import struct

from scripts.testbed.capture import connect_to, parse_frame, reassemble, server_hello


def frame(sport: int, dport: int, seq: int, payload: bytes, proto: int = 6,
          flags: int = 0x18) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0)
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


def test_only_a_syn_to_a_watched_port_opens_a_flow_not_a_client_port_in_the_range() -> None:
    assert connect_to(frame(50000, 40001, 1, b"", flags=0x02), 40000, 40063) == (50000, 40001)
    assert connect_to(frame(40001, 6379, 1, b"", flags=0x02), 40000, 40063) is None
    assert connect_to(frame(40001, 50000, 1, b"", flags=0x12), 40000, 40063) is None  # SYN-ACK
    assert connect_to(frame(50000, 40001, 1, b"", flags=0x10), 40000, 40063) is None


def test_segments_are_put_in_sequence_order_once_across_a_wrap() -> None:
    base = (1 << 32) - 3
    segs = [(base, b"abc"), ((base + 6) % (1 << 32), b"ghi"), ((base + 3) % (1 << 32), b"def"),
            ((base + 3) % (1 << 32), b"def"), ((base + 4) % (1 << 32), b"efgh")]
    assert reassemble(segs) == b"abcdefghi"
    assert reassemble([]) == b""


def hello(suite: int, version_ext: int | None) -> bytes:
    ext = b"" if version_ext is None else struct.pack("!HHH", 0x002B, 2, version_ext)
    ext = struct.pack("!HH", 0x0033, 4) + b"\0" * 4 + ext  # another extension before it
    body = b"\x03\x03" + b"\x11" * 32 + b"\x20" + b"\x22" * 32 + struct.pack("!HB", suite, 0)
    body += struct.pack("!H", len(ext)) + ext
    hs = b"\x02" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x03" + struct.pack("!H", len(hs)) + hs + b"\x17\x03\x03"


def test_the_server_hello_names_the_protocol_and_cipher_suite() -> None:
    assert server_hello(hello(0x1302, 0x0304)) == ("TLS 1.3", "TLS_AES_256_GCM_SHA384")
    assert server_hello(hello(0x1301, 0x0304)) == ("TLS 1.3", "TLS_AES_128_GCM_SHA256")
    assert server_hello(hello(0xC02C, None)) == ("TLS 1.2",
                                                 "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384")
    assert server_hello(b"QEVM\0\0\0\3") is None
