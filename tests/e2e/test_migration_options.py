"""Migration flags, xmlin, URIs and refusals, on real workers and QEMU."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from scripts.testbed.stack import Stack
from tasks.client import Client
from tasks.migrate_client import build_chain, params_from_options
from tests.conftest import CliResult, Guest, qemu_pids_of
from workers.errors import FerryError


def _defined(client: Client, make_guest: Callable[..., Guest], start: bool = True) -> Guest:
    guest = make_guest()
    client.call("alpha", "define", xml=guest.xml)
    if start:
        client.call("alpha", "start", domain=guest.name)
    return guest


def test_persistent_and_undefinesource_move_the_definition_too(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = _defined(client, make_guest)
    client.migrate(guest.name, "alpha", "beta", live=True, persistent=True,
                   undefinesource=True).wait(timeout=60)
    assert all(d["name"] != guest.name for d in client.call("alpha", "list", all=True))
    info = client.call("beta", "dominfo", domain=guest.name)
    assert info["persistent"] is True and info["state"] == "running"
    client.call("beta", "destroy", domain=guest.name)
    info = client.call("beta", "dominfo", domain=guest.name)
    assert (info["state"], info["persistent"]) == ("shutoff", True)


def test_non_live_migration_pauses_first_and_the_guest_runs_on_the_dest(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = _defined(client, make_guest)
    summary = client.migrate(guest.name, "alpha", "beta").wait(timeout=60)
    assert summary["flags"] == []
    info = client.call("beta", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("running", "migrated")
    guest.wait_kept_running()


def test_suspend_flag_leaves_the_guest_paused_on_the_dest(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = _defined(client, make_guest)
    client.migrate(guest.name, "alpha", "beta", live=True, suspend=True).wait(timeout=60)
    info = client.call("beta", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("paused", "user")


def test_offline_migration_moves_only_the_definition(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = _defined(client, make_guest, start=False)
    summary = client.migrate(guest.name, "alpha", "beta", offline=True, persistent=True,
                             undefinesource=True).wait(timeout=60)
    assert summary["result"] == "completed"
    info = client.call("beta", "dominfo", domain=guest.name)
    assert (info["state"], info["persistent"]) == ("shutoff", True)
    assert not qemu_pids_of(guest.uuid)
    assert all(d["name"] != guest.name for d in client.call("alpha", "list", all=True))


def test_xmlin_with_another_disk_path_is_used_on_the_dest(
        client: Client, make_guest: Callable[..., Guest], tmp_path: Path) -> None:
    guest = _defined(client, make_guest)
    moved = tmp_path / "moved.img"
    moved.write_bytes(guest.disk.read_bytes())
    xmlin = guest.xml.replace(str(guest.disk), str(moved))
    client.migrate(guest.name, "alpha", "beta", live=True, xmlin=xmlin).wait(timeout=60)
    xml = client.call("beta", "dumpxml", domain=guest.name)
    assert str(moved) in xml and str(guest.disk) not in xml


def test_xmlin_with_another_vcpu_count_is_refused_naming_vcpus(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = _defined(client, make_guest)
    xmlin = guest.xml.replace("<vcpu>1</vcpu>", "<vcpu>2</vcpu>")
    with pytest.raises(FerryError) as err:
        client.migrate(guest.name, "alpha", "beta", live=True, xmlin=xmlin).wait(timeout=60)
    assert "vcpus" in str(err.value) and "begin3" in str(err.value)
    info = client.call("alpha", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"]) == ("running", "booted")


def test_exec_migration_uri_is_refused_before_anything_starts(
        ferry: Callable[..., CliResult], client: Client,
        make_guest: Callable[..., Guest]) -> None:
    guest = _defined(client, make_guest)
    res = ferry("migrate", "-H", "alpha", guest.name, "beta", "--live",
                "--migrateuri", "exec:cat > /tmp/x")
    assert res.rc == 1 and res.err.startswith("error: ") and "exec" in res.err
    assert client.call("alpha", "domjobinfo", domain=guest.name)["type"] == "none"


def _tcp_ports(pid: int) -> set[tuple[int, int]]:
    """(local port, remote port) of every IPv4 TCP socket process `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[9] in inodes:
            ports.add((int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16)))
    return ports


def test_explicit_tcp_migration_uri_is_where_the_data_goes(
        client: Client, make_guest: Callable[..., Guest]) -> None:
    from scripts.testbed.stack import free_port, wait_for

    guest = _defined(client, make_guest)
    src_pid = client.call("alpha", "dominfo", domain=guest.name)["pid"]
    port = free_port()
    job = client.migrate(guest.name, "alpha", "beta", live=True, bandwidth_mib_s=1,
                         migrate_uri=f"tcp://127.0.0.1:{port}")
    wait_for(lambda: (job.info().get("data_processed") or 0) > 0, 30, "the copy to run")
    (dst_pid,) = [p for p in qemu_pids_of(guest.uuid) if p != src_pid]

    # The stream itself: the dest QEMU holds the connection on that port, the source's
    # QEMU its other end.
    assert any(local == port for local, _ in _tcp_ports(dst_pid)), _tcp_ports(dst_pid)
    assert any(remote == port for _, remote in _tcp_ports(src_pid)), _tcp_ports(src_pid)
    job.set_speed(0)
    job.wait(timeout=60)
    prepare = client.app.AsyncResult(f"{job.id}.prepare3").get(timeout=5)
    assert prepare["uri"] == f"tcp:127.0.0.1:{port}"


def test_same_host_uuid_is_refused_by_the_client_and_by_prepare(
        stack: Stack, client: Client, make_guest: Callable[..., Guest]) -> None:
    guest = _defined(client, make_guest)
    twin = stack.start_worker("twin", uuid=stack.workers["alpha"].uuid)
    try:
        with pytest.raises(FerryError) as err:
            client.migrate(guest.name, "alpha", "twin", live=True)
        assert "attempt to migrate guest to the same host" in str(err.value)
        # A service that builds the chain itself meets the same refusal in Prepare.
        p = params_from_options(guest.name, "alpha", "twin", live=True)
        with pytest.raises(FerryError) as err:
            build_chain(p, app=client.app).apply_async().get(timeout=60)
        assert "same host" in str(err.value) and "prepare" in str(err.value)
        info = client.call("alpha", "dominfo", domain=guest.name)
        assert (info["state"], info["reason"]) == ("running", "booted")
    finally:
        assert twin.proc is not None
        stack.remove_worker("twin")


def test_migrate_json_reports_a_failure_with_its_error(
        ferry: Callable[..., CliResult], client: Client,
        make_guest: Callable[..., Guest]) -> None:
    guest = _defined(client, make_guest, start=False)
    res = ferry("migrate", "-H", "alpha", guest.name, "beta", "--live", "--json")
    assert res.rc == 1
    out = json.loads(res.out)
    assert out["result"] == "failed" and "not running" in out["error"]
    assert res.err.strip().startswith("error: ") and len(res.err.strip().splitlines()) == 1


def test_a_service_process_that_never_imports_ferry_migrates_by_task_names(
        stack: Stack, client: Client, make_guest: Callable[..., Guest]) -> None:
    """In a process of its own, so that "without ferry" is checked, not assumed."""
    import subprocess
    import sys

    guest = _defined(client, make_guest)
    service = f"""
import json, sys
from celery import Celery, chain
app = Celery("service", broker={stack.broker_url!r}, backend={stack.broker_url!r})
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
params = {{"domain": {guest.name!r}, "source": "alpha", "dest": "beta", "flags": 1,
          "job_id": "svc-job-2"}}
names = [("begin3", "alpha"), ("prepare3", "beta"), ("perform3", "alpha"),
         ("finish3", "beta"), ("confirm3", "alpha")]
sigs = [app.signature("ferry." + n, args=(params,) if i == 0 else (), queue="host." + h)
        for i, (n, h) in enumerate(names)]
result = chain(*sigs).apply_async().get(timeout=60)
ferry = sorted(m for m in sys.modules if m.split(".")[0] in ("config", "workers", "tasks",
                                                            "scripts"))
print(json.dumps({{"result": result["result"], "ferry_modules": ferry}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    proc = subprocess.run([sys.executable, "-c", service], capture_output=True, text=True,
                          timeout=120, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"result": "completed", "ferry_modules": []}
    assert client.call("beta", "dominfo", domain=guest.name)["state"] == "running"
