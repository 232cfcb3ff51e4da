"""Peer-to-peer and tunnelled migration on real workers, Redis and QEMU."""

from __future__ import annotations

import signal
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
from tests.conftest import Guest, native_threads, pmemsave, qemu_pids_of, wait_info
from workers.errors import FerryError

VARIANTS = [
    pytest.param({"protocol": 3}, id="v3-direct"),
    pytest.param({"protocol": 3, "tunnelled": True}, id="v3-tunnelled"),
    pytest.param({"protocol": 2}, id="v2-direct"),
    pytest.param({"protocol": 2, "tunnelled": True}, id="v2-tunnelled"),
]


def _started(client: Client, make_guest: Callable[..., Guest], host: str = "alpha",
             **kw: Any) -> Guest:
    guest = make_guest(**kw)
    client.call(host, "define", xml=guest.xml)
    client.call(host, "start", domain=guest.name)
    guest.wait_tick()
    return guest


@pytest.mark.parametrize("opts", VARIANTS)
def test_p2p_moves_a_dirtying_guest_and_memory_stays_identical(
        opts: dict[str, Any], client: Client, make_guest: Callable[..., Guest],
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    a, b = request.getfixturevalue("nolock_hosts") if opts["protocol"] == 2 \
        else ("alpha", "beta")
    # TCG: the PVM KVM here boots the test guest slowly; the protocol is the same.
    guest = _started(client, make_guest, a, memory_mib=128, domain_type="qemu")
    summary = client.migrate(guest.name, a, b, live=True, p2p=True, **opts).wait(timeout=60)
    assert summary["result"] == "completed" and "peer2peer" in summary["flags"]
    info = client.call(b, "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("running", "migrated")
    guest.wait_kept_running(more=3)  # the boot it started with, counting on by one

    client.call(b, "suspend", domain=guest.name)
    size = 128 << 20
    before = pmemsave(client, b, guest.name, size, tmp_path / "a.mem")
    client.migrate(guest.name, b, a, live=True, p2p=True, **opts).wait(timeout=60)
    assert client.call(a, "dominfo", domain=guest.name)["state"] == "paused"
    assert pmemsave(client, a, guest.name, size, tmp_path / "b.mem") == before
    assert qemu_pids_of(guest.uuid) == [client.call(a, "dominfo", domain=guest.name)["pid"]]


def test_tunnelled_transfer_keeps_redis_memory_within_the_window(
        stack: Stack, client: Client, make_guest: Callable[..., Guest],
        image_dir: Path) -> None:
    image = build_image(image_dir / "random768.img", random_mib=768, rate_mib_s=0)
    guest = make_guest(memory_mib=1024, image=image, domain_type="qemu")
    client.call("alpha", "define", xml=guest.xml)
    client.call("alpha", "start", domain=guest.name)
    wait_for(lambda: "filled" in guest.serial.read_text(errors="replace"), 90,
             "the guest to fill 768 MiB")
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
                                 tunnelled=True).wait(timeout=180)
    finally:
        stop.set()
        sampler.join()
    assert summary["statistics"]["memory_processed"] > 700 << 20
    bound = (4 << 20) + (1 << 20)  # the window plus one chunk being pushed
    margin = 4 << 20
    assert peak[0] - baseline <= bound + margin, f"Redis grew by {peak[0] - baseline} bytes"


def test_abort_in_the_middle_of_a_tunnelled_transfer_closes_everything_quickly(
        stack: Stack, client: Client, make_guest: Callable[..., Guest],
        image_dir: Path) -> None:
    image = build_image(image_dir / "busy16tcg.img", dirty_mib=16, rate_mib_s=None)
    guest = _started(client, make_guest, memory_mib=128, image=image, domain_type="qemu")
    job = client.migrate(guest.name, "alpha", "beta", live=True, p2p=True, tunnelled=True,
                         bandwidth_mib_s=4)
    wait_for(lambda: (job.info().get("data_processed") or 0) > 0, 30, "the copy to run")
    workers = [w.proc.pid for w in stack.workers.values() if w.proc is not None]
    assert sum(native_threads(pid, "ferry-tunnel") for pid in workers) == 2

    t0 = time.monotonic()
    job.abort()
    with pytest.raises(FerryError, match="aborted"):
        job.wait(timeout=5)
    info = wait_info(client, "alpha", guest.name, lambda i: i["state"] == "running",
                     timeout=5)
    wait_for(lambda: sum(native_threads(pid, "ferry-tunnel") for pid in workers) == 0, 5,
             "both tunnel ends to close")
    assert time.monotonic() - t0 < 5
    assert qemu_pids_of(guest.uuid) == [info["pid"]]
    guest.wait_kept_running()
    r = redis.Redis.from_url(stack.broker_url)
    wait_for(lambda: not r.exists(f"ferry:tunnel:{job.id}:data"), 5, "the stream to go")


def test_two_p2p_migrations_in_opposite_directions_both_complete(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    a = _started(client, make_guest, "alpha", memory_mib=128, domain_type="qemu")
    b = _started(client, make_guest, "beta", memory_mib=128, domain_type="qemu")
    ja = client.migrate(a.name, "alpha", "beta", live=True, p2p=True)
    jb = client.migrate(b.name, "beta", "alpha", live=True, p2p=True, tunnelled=True)
    assert ja.wait(timeout=60)["result"] == "completed"
    assert jb.wait(timeout=60)["result"] == "completed"
    assert client.call("beta", "dominfo", domain=a.name)["state"] == "running"
    assert client.call("alpha", "dominfo", domain=b.name)["state"] == "running"
    a.wait_kept_running()
    b.wait_kept_running()


def test_dest_worker_stopped_during_p2p_gives_a_clear_error_and_the_source_runs(
        stack: Stack, client: Client, make_guest: Callable[..., Guest],
        faulty_host: Callable[[str], str], image_dir: Path) -> None:
    dest = faulty_host("")
    image = build_image(image_dir / "busy16tcg.img", dirty_mib=16, rate_mib_s=None)
    guest = _started(client, make_guest, memory_mib=128, image=image, domain_type="qemu")
    job = client.migrate(guest.name, "alpha", dest, live=True, p2p=True, bandwidth_mib_s=8)
    wait_for(lambda: (job.info().get("data_processed") or 0) > 0, 30, "the copy to run")

    stack.kill_worker(dest, signal.SIGTERM)
    job.set_max_downtime(5000)  # let it finish copying: Finish then finds no dest
    t0 = time.monotonic()
    with pytest.raises(FerryError) as err:
        job.wait(timeout=60)

    assert f"dest host '{dest}' is not alive" in str(err.value)
    assert time.monotonic() - t0 < 30
    info = wait_info(client, "alpha", guest.name, lambda i: i["state"] == "running")
    assert info["reason"] == "migration_canceled"
    guest.wait_kept_running()
