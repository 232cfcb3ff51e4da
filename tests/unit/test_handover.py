"""What the worker opens for a QEMU (its serial and channel sockets) and removes after it."""

from __future__ import annotations

import os
from pathlib import Path

from workers.devices import Channel
from workers.domain import Serial
from workers.process import bound_sockets, close_handover, open_handover, remove_sockets


def test_channel_and_bind_serial_sockets_are_bound_by_the_worker_and_removed_after(
        tmp_path: Path) -> None:
    chan = Channel(type="unix", name="org.qemu.guest_agent.0", path=str(tmp_path / "ga.sock"))
    serial = Serial(type="unix", port=0, path=str(tmp_path / "con.sock"), mode="bind")
    handover = open_handover([serial], [chan])
    try:
        assert set(handover.channel_sockets) == {0} and set(handover.serial_sockets) == {
            serial.alias}
        bound = bound_sockets([serial], [chan])
        assert [p for p, _, _ in bound] == [serial.path, chan.path]
    finally:
        close_handover(handover)
    remove_sockets(bound)
    assert not os.path.exists(chan.path) and not os.path.exists(str(serial.path))


def test_a_socket_bound_again_at_the_path_since_is_left_alone(tmp_path: Path) -> None:
    chan = Channel(type="unix", name="x", path=str(tmp_path / "ga.sock"))
    close_handover(open_handover([], [chan]))
    old = bound_sockets([], [chan])
    close_handover(open_handover([], [chan]))  # e.g. the dest of a migration on this machine
    remove_sockets(old)
    assert os.path.exists(str(chan.path))
