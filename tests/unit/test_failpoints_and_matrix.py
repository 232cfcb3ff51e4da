"""Failpoints armed at run time, and the fault matrix's case list."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.e2e.faultcases import EXPECTED, At, Fault, Mode, Outcome, cases
from workers import failpoints
from workers.errors import QemuError


@pytest.fixture(autouse=True)
def _disarm() -> object:
    yield
    failpoints.configure("")


def test_a_point_armed_by_a_file_raises_and_disarmed_does_nothing(tmp_path: Path) -> None:
    failpoints.configure("", str(tmp_path))
    asyncio.run(failpoints.hit("begin3.end"))  # not armed: returns at once

    (tmp_path / "begin3.end").write_text("raise")
    with pytest.raises(QemuError, match=r"failpoint begin3\.end"):
        asyncio.run(failpoints.hit("begin3.end"))


def test_a_paused_point_marks_the_hit_and_goes_on_once_released(tmp_path: Path) -> None:
    failpoints.configure("", str(tmp_path))
    (tmp_path / "finish3.start").write_text("pause")

    async def scenario() -> bool:
        phase = asyncio.create_task(failpoints.hit("finish3.start"))
        while not (tmp_path / "finish3.start.hit").exists():
            await asyncio.sleep(0.01)
        held = not phase.done()
        (tmp_path / "finish3.start").unlink()
        await asyncio.wait_for(phase, 5)
        return held

    assert asyncio.run(scenario())


def test_an_unknown_action_is_refused() -> None:
    with pytest.raises(ValueError, match="action must be one of"):
        failpoints.configure("begin3.end=explode")


def test_the_matrix_has_every_cell_but_the_dest_qemu_before_it_exists() -> None:
    all_cases = cases()
    direct = [c for c in all_cases if c.mode in (Mode.MANAGED, Mode.P2P)
              and c.fault != Fault.TLS]
    assert len(direct) == 2 * (len(EXPECTED) * len(At) - 1)
    assert not [c for c in all_cases if (c.fault, c.at) == (Fault.DST_QEMU, At.BEGIN)]
    assert len({c.id for c in all_cases}) == len(all_cases)
    assert all(len(row) == len(At) for row in EXPECTED.values())


def test_p2p_expects_what_managed_expects_in_every_cell() -> None:
    by_cell: dict[tuple[Fault, At], dict[Mode, Outcome]] = {}
    for c in cases():
        by_cell.setdefault((c.fault, c.at), {})[c.mode] = c.expected
    differ = [cell for cell, modes in by_cell.items()
              if Mode.P2P in modes and modes[Mode.MANAGED] != modes[Mode.P2P]]
    assert differ == []
    assert by_cell[(Fault.SRC_WORKER, At.PREPARE)][Mode.MANAGED] == Outcome.S


def test_tunnelled_runs_the_data_path_faults_while_copying_all_ending_on_the_source() -> None:
    tunnelled = [c for c in cases() if c.mode == Mode.TUNNELLED]
    assert {(c.fault, c.at) for c in tunnelled} == {
        (Fault.SRC_WORKER, At.COPYING), (Fault.DST_WORKER, At.COPYING),
        (Fault.REDIS, At.COPYING)}
    assert {c.expected for c in tunnelled} == {Outcome.S}


def test_tls_refusals_at_prepare_and_in_perform_leave_the_guest_on_the_source() -> None:
    tls = [c for c in cases() if c.fault == Fault.TLS]
    assert {(c.mode, c.at) for c in tls} == {(m, a) for m in (Mode.MANAGED, Mode.P2P)
                                             for a in (At.PREPARE, At.COPYING)}
    assert {c.expected for c in tls} == {Outcome.S}
    assert all(c.point is None for c in tls)  # set up in the certificates, nothing held


def test_storage_copy_runs_every_fault_while_the_disks_are_mirrored() -> None:
    storage = [c for c in cases() if c.mode == Mode.STORAGE]
    assert {c.fault for c in storage} == set(EXPECTED)  # every fault of the full rows
    assert {c.at for c in storage} == {At.COPYING}
    assert {c.id for c in storage} >= {"storage-abort-copying", "storage-dst_qemu-copying"}
