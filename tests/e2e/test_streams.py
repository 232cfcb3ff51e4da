"""Parallel connections, compression and the switch-over, on real workers, Redis and QEMU.

Memory identity as everywhere: the guest is paused, its memory saved, moved (it
stays paused), saved again on the dest and compared.  Guests run under TCG (the
PVM KVM here runs the test guest slowly); the stream is QEMU's either way.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from scripts.testbed.guestimage import build_image
from scripts.testbed.stack import Stack, wait_for
from tasks.client import Client
from tests.conftest import CliResult, Guest, native_threads, pmemsave, qemu_pids_of, wait_info
from workers.errors import FerryError

MEMORY_MIB = 128
RANDOM_MIB = 32  # pages that really go through the multifd channels (zero pages do not)


def _filled(client: Client, make_guest: Callable[..., Guest], image_dir: Path,
            host: str = "alpha") -> Guest:
    image = build_image(image_dir / "random32.img", random_mib=RANDOM_MIB, rate_mib_s=0)
    guest = make_guest(memory_mib=MEMORY_MIB, image=image, domain_type="qemu")
    client.call(host, "define", xml=guest.xml)
    client.call(host, "start", domain=guest.name)
    wait_for(lambda: "filled" in guest.serial.read_text(errors="replace"), 60,
             "the guest to fill its memory")
    return guest


def _moved_identical(client: Client, guest: Guest, tmp_path: Path, src: str, dst: str,
                     **options: Any) -> dict[str, Any]:
    """Pause, save, move (paused), save on the dest, compare; the migration's summary."""
    client.call(src, "suspend", domain=guest.name)
    size = MEMORY_MIB << 20
    before = pmemsave(client, src, guest.name, size, tmp_path / "before.mem")
    summary = client.migrate(guest.name, src, dst, live=True, **options).wait(timeout=120)
    info = client.call(dst, "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("paused", "user")
    assert pmemsave(client, dst, guest.name, size, tmp_path / "after.mem") == before
    assert qemu_pids_of(guest.uuid) == [info["pid"]]
    return dict(summary)


def test_parallel_direct_opens_the_connections_asked_for_and_memory_stays_identical(
        client: Client, make_guest: Callable[..., Guest], image_dir: Path,
        tmp_path: Path) -> None:
    guest = _filled(client, make_guest, image_dir)
    summary = _moved_identical(client, guest, tmp_path, "alpha", "beta", parallel=True,
                               parallel_connections=4)
    assert "parallel" in summary["flags"]
    assert summary["statistics"]["parallel_connections"] == 4
    for host in ("alpha", "beta"):
        done = client.call(host, "domjobinfo", domain=guest.name, completed=True)
        assert done["type"] == "completed" and done["parallel_connections"] == 4


def test_parallel_tunnelled_gives_each_channel_its_stream_and_closes_them_all(
        stack: Stack, client: Client, make_guest: Callable[..., Guest], image_dir: Path,
        tmp_path: Path) -> None:
    guest = _filled(client, make_guest, image_dir)
    summary = _moved_identical(client, guest, tmp_path, "alpha", "beta", p2p=True,
                               tunnelled=True, parallel=True, parallel_connections=3)
    stats = summary["statistics"]
    assert stats["parallel_connections"] == 3
    assert stats["stream_bytes"] >= RANDOM_MIB << 20  # what went through the broker
    workers = [w.proc.pid for w in stack.workers.values() if w.proc is not None]
    names = ("ferry-tunnel", "ferry-tun-back")
    wait_for(lambda: sum(native_threads(pid, n) for pid in workers for n in names) == 0, 10,
             "the tunnel's threads to end")
    r = redis.Redis.from_url(stack.broker_url)
    left = [k for k in r.scan_iter(f"ferry:tunnel:{summary['job_id']}:*")
            if r.ttl(k) == -1]
    assert left == []  # nothing of the stream stays without an expiry


def test_a_parallel_tunnel_keeps_redis_memory_within_a_window_per_channel(
        stack: Stack, client: Client, make_guest: Callable[..., Guest],
        image_dir: Path) -> None:
    image = build_image(image_dir / "random256.img", random_mib=256, rate_mib_s=0)
    guest = make_guest(memory_mib=384, image=image, domain_type="qemu")
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    wait_for(lambda: "filled" in guest.serial.read_text(errors="replace"), 90,
             "the guest to fill 256 MiB")
    r = redis.Redis.from_url(stack.broker_url)
    baseline = int(r.info("memory")["used_memory"])
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], int(r.info("memory")["used_memory"]))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        summary = client.migrate(guest.name, "alpha", "beta", live=True, p2p=True,
                                 tunnelled=True, parallel=True,
                                 parallel_connections=2).wait(timeout=180)
    finally:
        stop.set()
        sampler.join()
    assert summary["statistics"]["stream_bytes"] > 250 << 20
    channels = 3  # the main one and two multifd connections, a window of 4 MiB each
    bound = channels * ((4 << 20) + (1 << 20))  # each window plus a chunk being pushed
    margin = 4 << 20
    assert peak[0] - baseline <= bound + margin, f"Redis grew by {peak[0] - baseline} bytes"


def test_zstd_over_parallel_connections_moves_memory_intact(
        client: Client, make_guest: Callable[..., Guest], image_dir: Path,
        tmp_path: Path) -> None:
    guest = _filled(client, make_guest, image_dir)
    summary = _moved_identical(client, guest, tmp_path, "alpha", "beta", parallel=True,
                               compressed=True, comp_methods="zstd", comp_zstd_level=3)
    assert summary["statistics"]["compression_methods"] == ["zstd"]


def test_zlib_through_the_parallel_tunnel_moves_memory_intact(
        client: Client, make_guest: Callable[..., Guest], image_dir: Path,
        tmp_path: Path) -> None:
    guest = _filled(client, make_guest, image_dir)
    summary = _moved_identical(client, guest, tmp_path, "alpha", "beta", p2p=True,
                               tunnelled=True, parallel=True, comp_methods=["zlib"])
    assert summary["statistics"]["compression_methods"] == ["zlib"]


def test_xbzrle_encodes_pages_a_busy_guest_rewrites_and_memory_stays_identical(
        client: Client, make_guest: Callable[..., Guest], image_dir: Path,
        faulty_host: Callable[..., str], tmp_path: Path) -> None:
    points = tmp_path / "points"
    points.mkdir()
    src = faulty_host("", FERRY_FAILPOINT_DIR=str(points))
    image = build_image(image_dir / "busy16tcg.img", dirty_mib=16, rate_mib_s=None)
    guest = make_guest(memory_mib=MEMORY_MIB, image=image, domain_type="qemu")
    client.call(src, "define", xml=guest.xml)
    client.call(src, "start", domain=guest.name)
    guest.wait_counter_above(0)
    # Hold the migration at the switch-over point, where QEMU has stopped the guest: its
    # memory there is what the dest must get.  --suspend: the dest stays paused, so both
    # memories can be compared at the end.
    hold, held = points / "perform3.switchover", points / "perform3.switchover.hit"
    hold.write_text("pause")
    job = client.migrate(guest.name, src, "alpha", live=True, suspend=True, compressed=True,
                         comp_xbzrle_cache=32 << 20, bandwidth_mib_s=32, max_downtime_ms=1)
    info = wait_for(lambda: held.exists() or ((i := job.info()).get("compression_pages") and i),
                    90, "xbzrle to encode rewritten pages")
    if isinstance(info, dict):
        assert info["compression_methods"] == ["xbzrle"]
        assert info["compression_cache"] == 32 << 20
    # Stop the guest: its rewriting may never converge (QEMU weighs what is left by its
    # uncompressed size against what xbzrle sends per second).
    job.suspend()
    job.set_max_downtime(500)
    job.set_speed(0)
    wait_for(held.exists, 60, "the migration to reach the switch-over")
    size = MEMORY_MIB << 20
    before = pmemsave(client, src, guest.name, size, tmp_path / "before.mem")
    hold.unlink()
    stats = job.wait(timeout=120)["statistics"]
    assert stats["compression_pages"] > 0 and stats["compression_cache_hits"] > 0
    assert stats["compression_cache_misses"] > 0
    info = client.call("alpha", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("paused", "user")
    assert pmemsave(client, "alpha", guest.name, size, tmp_path / "after.mem") == before


@pytest.mark.parametrize("tunnelled", [False, True], ids=["direct", "tunnelled"])
def test_the_guests_pause_is_reported_from_stop_on_the_source_to_resume_on_the_dest(
        tunnelled: bool, client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(memory_mib=MEMORY_MIB, domain_type="qemu")
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    guest.wait_counter_above(0)
    summary = client.migrate(guest.name, "alpha", "beta", live=True, p2p=tunnelled,
                             tunnelled=tunnelled).wait(timeout=60)
    pause = summary["statistics"]["guest_pause_ms"]
    assert 0 < pause < 60_000
    for host in ("alpha", "beta"):
        done = client.call(host, "domjobinfo", domain=guest.name, completed=True)
        assert done["guest_pause_ms"] == pause
    guest.wait_counter_above(guest.counters()[-1] + 2)


@pytest.mark.parametrize("tunnelled", [False, True], ids=["direct", "tunnelled"])
def test_a_dest_that_cannot_load_the_state_leaves_the_guest_running_on_the_source(
        tunnelled: bool, client: Client, make_guest: Callable[..., Guest]) -> None:
    """The return path: without it the source QEMU reports `completed` once it has sent
    everything, and Confirm would kill the only good copy."""
    guest = make_guest(memory_mib=64, domain_type="qemu")
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    guest.wait_counter_above(0)
    # A device the dest's QEMU does not have: its state fails to load after all of RAM.
    client.call("alpha", "qemu_monitor_command", domain=guest.name, command=json.dumps(
        {"execute": "device_add", "arguments": {"driver": "virtio-balloon-pci",
                                                "id": "extra"}}))
    with pytest.raises(FerryError):
        client.migrate(guest.name, "alpha", "beta", live=True, p2p=tunnelled,
                       tunnelled=tunnelled).wait(timeout=60)
    info = wait_info(client, "alpha", guest.name, lambda i: i["state"] == "running")
    assert info["reason"] == "migration_canceled"
    assert qemu_pids_of(guest.uuid) == [info["pid"]]
    guest.wait_counter_above(guest.counters()[-1] + 2)


def test_a_failure_at_the_switch_over_point_cancels_and_the_source_runs_on(
        client: Client, make_guest: Callable[..., Guest],
        faulty_host: Callable[[str], str]) -> None:
    src = faulty_host("perform3.switchover=raise")
    guest = make_guest(memory_mib=64, domain_type="qemu")
    client.call(src, "define", xml=guest.xml)
    client.call(src, "start", domain=guest.name)
    guest.wait_counter_above(0)
    with pytest.raises(FerryError, match=r"perform3\.switchover"):
        client.migrate(guest.name, src, "alpha", live=True).wait(timeout=60)
    info = wait_info(client, src, guest.name, lambda i: i["state"] == "running")
    assert info["reason"] == "migration_canceled"
    assert qemu_pids_of(guest.uuid) == [info["pid"]]
    guest.wait_counter_above(guest.counters()[-1] + 2)


@pytest.mark.parametrize("args, message", [
    (["--comp-methods", "zstd"], "Compression method 'zstd' is only supported with parallel"),
    (["--parallel", "--parallel-connections", "0"], "parallel connections must be in 1..255"),
    (["--parallel", "--parallel-connections", "300"], "parallel connections must be in"),
    (["--compressed", "--comp-methods", "lz4"], "Unsupported compression method 'lz4'"),
    (["--parallel-connections", "3"], "Turn parallel migration on to tune it"),
    (["--parallel", "--comp-methods", "xbzrle"], "isn't supported with parallel migration"),
])
def test_bad_combinations_are_refused_with_one_line_and_nothing_changes(
        args: list[str], message: str, ferry: Callable[..., CliResult], client: Client,
        make_guest: Callable[..., Guest]) -> None:
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    res = ferry("migrate", "-H", "alpha", guest.name, "beta", "--live", *args)
    assert res.rc == 1 and res.err.startswith("error: ") and message in res.err
    assert len(res.err.strip().splitlines()) == 1
    assert client.call("alpha", "domjobinfo", domain=guest.name)["type"] == "none"
    assert client.call("alpha", "dominfo", domain=guest.name)["state"] == "running"
    assert all(d["name"] != guest.name for d in client.call("beta", "list", all=True))
