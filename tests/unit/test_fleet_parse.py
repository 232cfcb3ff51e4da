"""The fleet helper's pure part: reading listeners out of /proc/net/tcp."""

from __future__ import annotations

from scripts.testbed.fleet import parse_listeners

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0C0012C6:C000 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1
   1: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1
   2: 0C0012C6:C000 0B0012C6:D431 01 00000000:00000000 00:00000000 00000000     0        0 99 1
"""


def test_listeners_are_read_with_their_dotted_address_port_and_inode() -> None:
    assert parse_listeners(PROC_NET_TCP) == [("198.18.0.12", 49152, 4242),
                                             ("127.0.0.1", 6379, 77)]


def test_established_sockets_are_not_listeners() -> None:
    assert all(inode != 99 for _, _, inode in parse_listeners(PROC_NET_TCP))
