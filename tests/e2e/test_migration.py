"""Live migration v3 and v2 on real workers and real QEMU guests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from scripts.testbed.guestimage import build_image
from tasks.client import Client
from tests.conftest import CliResult, Guest, pmemsave, qemu_pids_of


def _move(client: Client, guest: Guest, src: str, dst: str, **opts: object) -> dict[str, object]:
    summary = client.migrate(guest.name, src, dst, **opts).wait(timeout=120)
    assert summary["result"] == "completed"
    return summary


def _phases(summary: dict[str, object]) -> list[tuple[str, str]]:
    return [(p["phase"], p["host"]) for p in summary["phases"]]  # type: ignore[attr-defined,index]


@pytest.mark.parametrize("protocol", [3, 2])
def test_live_migration_there_and_back_keeps_the_guest_counting(
        protocol: int, client: Client, make_guest: Callable[..., Guest],
        request: pytest.FixtureRequest) -> None:
    # v2 needs hosts without a lock manager that keeps state (the lease issue).
    a, b = request.getfixturevalue("nolock_hosts") if protocol == 2 else ("alpha", "beta")
    guest = make_guest(memory_mib=128)
    client.call(a, "define", xml=guest.xml)
    client.call(a, "start", domain=guest.name)
    first = guest.wait_tick()

    there = _move(client, guest, a, b, live=True, protocol=protocol)
    src = client.call(a, "dominfo", domain=guest.name)
    dst = client.call(b, "dominfo", domain=guest.name)
    assert (src["state"], src["reason"], src["pid"]) == ("shutoff", "migrated", None)
    assert (dst["state"], dst["reason"]) == ("running", "migrated")
    assert dst["persistent"] is False and len(qemu_pids_of(guest.uuid)) == 1
    guest.wait_kept_running(first, more=3)  # the same boot, counting on by one

    back = _move(client, guest, b, a, live=True, protocol=protocol)
    assert client.call(a, "dominfo", domain=guest.name)["reason"] == "migrated"
    assert all(d["name"] != guest.name for d in client.call(b, "list", all=True))
    guest.wait_kept_running(first, more=3)

    if protocol == 3:
        assert _phases(there) == [("begin3", a), ("prepare", b), ("perform3", a),
                                  ("finish3", b), ("confirm3", a)]
    else:
        assert _phases(back) == [("prepare", a), ("perform2", b), ("finish2", a)]
    stats = there["statistics"]
    assert isinstance(stats, dict) and stats["memory_total"] >= 128 * 1024 * 1024 * 0.9
    # QEMU's downtime, a pause inside the migration (that it is QEMU's own figure:
    # test_migration_proofs.py)
    assert isinstance(stats["downtime"], int)
    assert stats["downtime"] <= stats["time_elapsed"]


def test_completed_statistics_reach_the_dest_through_the_cookie(
        ferry: Callable[..., CliResult], client: Client,
        make_guest: Callable[..., Guest]) -> None:
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    res = ferry("migrate", "-H", "alpha", guest.name, "beta", "--live", "--json")
    assert res.rc == 0, res.err
    summary = json.loads(res.out)
    assert summary["result"] == "completed" and summary["dest"] == "beta"

    src = json.loads(ferry("domjobinfo", "-H", "alpha", guest.name, "--completed",
                           "--json").out)
    dst = json.loads(ferry("domjobinfo", "-H", "beta", guest.name, "--completed",
                           "--json").out)
    assert (src["type"], src["operation"]) == ("completed", "outgoing_migration")
    assert (dst["type"], dst["operation"]) == ("completed", "incoming_migration")
    assert dst["data_processed"] == src["data_processed"] > 0
    assert dst["downtime_ms"] == summary["statistics"]["downtime"]
    assert json.loads(ferry("domjobinfo", "-H", "beta", guest.name, "--json").out)["type"] \
        == "none"


def test_paused_guest_memory_is_identical_after_migration_and_stays_paused(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    guest = make_guest(memory_mib=128)
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    guest.wait_counter_above(2)
    client.call("alpha", "suspend", domain=guest.name)
    size = 128 * 1024 * 1024
    before = pmemsave(client, "alpha", guest.name, size, tmp_path / "src.mem")

    _move(client, guest, "alpha", "beta", live=True)

    info = client.call("beta", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("paused", "user")
    assert pmemsave(client, "beta", guest.name, size, tmp_path / "dst.mem") == before


def test_memory_of_a_guest_with_512_mib_random_is_identical_after_migration(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path,
        image_dir: Path) -> None:
    image = build_image(image_dir / "random512.img", random_mib=512, rate_mib_s=0)
    # TCG: this machine's KVM (PVM) emulates the non-paged test guest at ~1 MIPS, so
    # filling 512 MiB would take minutes there; TCG fills it in seconds.
    guest = make_guest(memory_mib=640, image=image, domain_type="qemu")
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    from scripts.testbed.stack import wait_for

    wait_for(lambda: "filled" in guest.serial.read_text(errors="replace"), 60,
             "the guest to fill its random memory")
    client.call("alpha", "suspend", domain=guest.name)
    size = 640 * 1024 * 1024
    before = pmemsave(client, "alpha", guest.name, size, tmp_path / "src.mem")

    summary = _move(client, guest, "alpha", "beta", live=True)

    assert summary["statistics"]["memory_processed"] > 500 * 1024 * 1024  # type: ignore[index]
    assert pmemsave(client, "beta", guest.name, size, tmp_path / "dst.mem") == before
