"""Domain lifecycle on real workers and real QEMU, through the `ferry` CLI."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from scripts.testbed.guestimage import Tick
from scripts.testbed.stack import Stack, wait_for
from tasks.client import Client
from tests.conftest import CliResult, Guest, pid_alive


def _ok(res: CliResult) -> CliResult:
    assert res.rc == 0, f"rc={res.rc} err={res.err!r} out={res.out!r}"
    return res


def _state(ferry: Callable[..., CliResult], host: str, name: str) -> tuple[str, str]:
    info = json.loads(_ok(ferry("dominfo", "-H", host, name, "--json")).out)
    return info["state"], info["reason"]


def test_lifecycle_through_the_cli_goes_through_libvirts_states_in_order(
        ferry: Callable[..., CliResult], make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    guest = make_guest()
    xml_file = tmp_path / "dom.xml"
    xml_file.write_text(guest.xml)
    seen = []

    _ok(ferry("define", "-H", "alpha", str(xml_file)))
    seen.append(_state(ferry, "alpha", guest.name))
    _ok(ferry("start", "-H", "alpha", guest.name))
    listed = json.loads(_ok(ferry("list", "-H", "alpha", "--json")).out)
    mine = [d for d in listed if d["name"] == guest.name]
    assert len(mine) == 1 and mine[0]["pid"] and pid_alive(mine[0]["pid"])
    assert mine[0]["uuid"] == guest.uuid and mine[0]["host"] == "alpha"
    assert mine[0]["persistent"] is True and mine[0]["memory_kib"] == 64 * 1024
    seen.append(_state(ferry, "alpha", guest.name))
    _ok(ferry("suspend", "-H", "alpha", guest.name))
    seen.append(_state(ferry, "alpha", guest.name))
    _ok(ferry("resume", "-H", "alpha", guest.name))
    seen.append(_state(ferry, "alpha", guest.name))
    pid = mine[0]["pid"]
    _ok(ferry("destroy", "-H", "alpha", guest.name))
    seen.append(_state(ferry, "alpha", guest.name))
    assert not pid_alive(pid)
    _ok(ferry("undefine", "-H", "alpha", guest.name))

    assert seen == [("shutoff", "unknown"), ("running", "booted"), ("paused", "user"),
                    ("running", "unpaused"), ("shutoff", "destroyed")]
    all_names = [d["name"] for d in json.loads(_ok(ferry("list", "-H", "alpha", "--all",
                                                         "--json")).out)]
    assert guest.name not in all_names
    assert ferry("domstate", "-H", "alpha", guest.name).rc == 1


def test_domstate_with_reason_prints_state_and_reason(
        ferry: Callable[..., CliResult], client: Client,
        make_guest: Callable[..., Guest]) -> None:
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name, paused=True)
    assert _ok(ferry("domstate", "-H", "alpha", guest.name, "--reason")).out.strip() == \
        "paused (user)"
    assert _ok(ferry("domstate", "-H", "alpha", guest.name)).out.strip() == "paused"


def test_serial_counter_keeps_increasing_while_the_guest_runs(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    first = guest.wait_counter_above(0)
    second = guest.wait_counter_above(first + 5)
    assert second > first + 5
    client.call("alpha", "suspend", domain=guest.name)
    frozen = guest.counters()[-1]
    client.call("alpha", "resume", domain=guest.name)
    assert guest.wait_kept_running(more=3).count > frozen


def test_a_rebooted_guest_fools_the_counter_but_not_the_continuity_check(
        ferry: Callable[..., CliResult], client: Client,
        make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(domain_type="qemu")
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    before = guest.wait_kept_running()

    _ok(ferry("qemu-monitor-command", "-H", "alpha", guest.name,
              '{"execute": "system_reset"}'))

    # The guest boots again into the same append-mode log: a new boot id, counting from 1.
    def new_boot() -> list[Tick]:
        return [t for t in guest.ticks() if t.boot != before.boot]

    ticks = wait_for(new_boot, 20, "the rebooted guest to count")
    assert isinstance(ticks, list) and ticks[0].count == 1
    assert guest.serial.read_text().count("ferry-guest ready") == 2
    # A check of the counter alone is fooled once the new boot counts past the old count...
    assert guest.wait_counter_above(before.count) > before.count
    # ...the boot id is not: the same check every "kept running" test makes.
    with pytest.raises(AssertionError, match=f"boot id changed from {before.boot} to "
                                             f"{ticks[0].boot} .*the guest was restarted"):
        guest.wait_kept_running()
    with pytest.raises(AssertionError, match="boot id changed"):
        guest.wait_kept_running(before)


def test_worker_killed_and_restarted_finds_its_guest_running_with_the_same_pid(
        stack: Stack, client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    pid = client.call("alpha", "start", domain=guest.name)["pid"]

    stack.kill_worker("alpha", signal.SIGKILL)
    assert pid_alive(pid), "the guest must outlive its worker"
    before = guest.wait_tick()
    w = stack.start_worker("alpha")

    info = client.call("alpha", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"], info["pid"]) == ("running", "booted", pid)
    assert w.proc is not None and w.proc.pid != pid
    assert guest.wait_kept_running(more=3).count > before.count
    # The restarted worker owns the monitor again: a command reaches QEMU.
    reply = client.call("alpha", "qemu_monitor_command", domain=guest.name,
                        command='{"execute": "query-status"}')
    assert reply["status"] == "running"


def test_qemu_killed_from_outside_becomes_shutoff_crashed_without_any_task(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    pid = client.call("alpha", "start", domain=guest.name)["pid"]

    os.kill(pid, signal.SIGKILL)

    def shutoff() -> dict[str, object] | None:
        info = client.call("alpha", "dominfo", domain=guest.name)
        return info if info["state"] == "shutoff" else None

    info = wait_for(shutoff, 10, "the domain to be seen shutoff")
    assert isinstance(info, dict)
    assert info["reason"] == "crashed" and info["pid"] is None
    # It can be started again.
    again = client.call("alpha", "start", domain=guest.name)
    assert again["state"] == "running" and again["pid"] != pid


def test_start_paused_then_resume_runs_the_guest(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    info = client.call("alpha", "start", domain=guest.name, paused=True)
    assert (info["state"], info["reason"]) == ("paused", "user")
    assert guest.counters() == []
    info = client.call("alpha", "resume", domain=guest.name)
    assert (info["state"], info["reason"]) == ("running", "unpaused")
    assert guest.wait_counter_above(0) >= 1


def test_disk_queries_and_monitor_passthrough_answer_for_a_running_guest(
        ferry: Callable[..., CliResult], client: Client,
        make_guest: Callable[..., Guest]) -> None:
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    guest.wait_counter_above(0)  # the guest has read its disk by now

    stats = json.loads(_ok(ferry("domblkstat", "-H", "alpha", guest.name, "hda",
                                 "--json")).out)
    assert stats["hda"]["rd_req"] > 0 and stats["hda"]["rd_bytes"] > 0
    info = json.loads(_ok(ferry("domblkinfo", "-H", "alpha", guest.name, "hda",
                                "--json")).out)
    assert info["capacity"] == guest.disk.stat().st_size == info["physical"]
    out = _ok(ferry("qemu-monitor-command", "-H", "alpha", guest.name,
                    '{"execute":"query-name"}')).out
    assert json.loads(out) == {"name": guest.name}
    hmp = _ok(ferry("qemu-monitor-command", "-H", "alpha", guest.name, "--hmp",
                    "info status")).out
    assert "running" in hmp
    xml = _ok(ferry("dumpxml", "-H", "alpha", guest.name)).out
    assert f"<name>{guest.name}</name>" in xml and guest.uuid in xml


def test_hosts_lists_both_hosts_alive_with_distinct_uuids(
        ferry: Callable[..., CliResult]) -> None:
    hosts = {h["name"]: h for h in json.loads(_ok(ferry("hosts", "--json")).out)}
    assert hosts["alpha"]["alive"] and hosts["beta"]["alive"]
    assert hosts["alpha"]["uuid"] != hosts["beta"]["uuid"]
    assert hosts["alpha"]["address"] == "127.0.0.1"
