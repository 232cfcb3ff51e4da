"""Domain lifecycle on one host: define, start, pause, resume, destroy, queries.

Every function is a coroutine run on the agent loop (see HostAgent.call)
and returns JSON-able data.  Guards name the state each operation needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workers import cpucheck, cpumodel, dac, netdev
from workers.agent import HostAgent
from workers.domain import DomainDef, with_channel_paths, with_graphics_ports, with_tap_names
from workers.domain_states import DomainState, PausedReason, RunningReason, ShutoffReason
from workers.domain_xml import format_domain_xml
from workers.domobj import DomainObj
from workers.errors import InvalidInputError, NotFoundError, OperationInvalidError, QemuError
from workers.guestfiles import channel_dir, ensure_nvram, with_nvram_path
from workers.job_types import JobOperation
from workers.process import (
    QemuProcess,
    bound_sockets,
    close_handover,
    listening_socket,
    log_tail,
    open_handover,
    remove_sockets,
    spawn,
)
from workers.qemu_argv import Handover, build_qemu_argv, qemu_has_spice
from workers.store import atomic_write


def nvram_dir(agent: HostAgent) -> Path:
    return agent.settings.nvram_dir or agent.settings.state_dir / "nvram"


async def define(agent: HostAgent, xml: str) -> dict[str, Any]:
    new = with_nvram_path(agent.parse(xml), nvram_dir(agent))
    if new.firmware is not None and new.firmware.nvram is not None:
        agent.allowed.check(new.firmware.nvram, "os nvram")
    for dom in agent.domains.values():
        if dom.name == new.name and dom.uuid != new.uuid:
            raise InvalidInputError(f"domain '{new.name}' already exists with uuid {dom.uuid}")
        if dom.uuid == new.uuid and dom.name != new.name:
            raise InvalidInputError(f"domain with uuid {new.uuid} already exists as '{dom.name}'")
    agent.store.save_definition(new.name, format_domain_xml(new))
    existing = agent.domains.get(new.name)
    if existing is not None:
        existing.require_no_job("redefine")
        existing.definition = new  # a running domain uses it from its next start
        return existing.info(agent.host)
    dom = agent.domains[new.name] = DomainObj(definition=new)
    return dom.info(agent.host)


def inactive_domain_for(agent: HostAgent, d: DomainDef, op: str) -> DomainObj | None:
    """The domain a guest arriving here (migrated in, restored) starts in: None when this
    host has none of its name, else that one, which must have `d`'s uuid, be inactive and
    in no job.  A uuid held here by another name is refused."""
    for other in agent.domains.values():
        if other.uuid == d.uuid and other.name != d.name:
            raise InvalidInputError(f"domain with uuid {d.uuid} already exists as "
                                    f"'{other.name}'")
    dom = agent.domains.get(d.name)
    if dom is None:
        return None
    if dom.uuid != d.uuid:
        raise InvalidInputError(f"domain '{d.name}' already exists with uuid {dom.uuid}")
    dom.require_inactive(op)
    dom.require_no_job(op)
    return dom


async def undefine(agent: HostAgent, name: str) -> dict[str, Any]:
    dom = agent.lookup(name)
    if not dom.persistent:
        raise OperationInvalidError(f"cannot undefine transient domain '{dom.name}'")
    dom.require_no_job("undefine")
    name, uuid = dom.name, dom.uuid
    agent.store.delete_definition(name)
    if not dom.active:
        agent.domains.pop(name, None)
    dom.definition = None  # a running domain goes on as a transient one
    return {"name": name, "uuid": uuid, "host": agent.host, "undefined": True}


def _with_ports(agent: HostAgent, dom: DomainObj, d: DomainDef) -> DomainDef:
    """Fill autoport graphics from the host's range; the ports go back when QEMU exits."""
    ports = []
    for g in d.graphics:
        if g.autoport and g.port is None:
            ports.append(agent.graphics_ports.acquire(g.listen or "127.0.0.1"))
    dom.ports.extend(("graphics", p) for p in ports)
    return with_graphics_ports(d, ports) if ports else d


async def check_cpu(agent: HostAgent, d: DomainDef) -> None:
    """Refuse a guest CPU this host cannot give it (workers/cpucheck.py)."""
    if not cpucheck.needs_check(d):
        return
    accel = "kvm" if agent.kvm and d.type == "kvm" else "tcg"
    models = (d.cpu_model,) if d.cpu_model else ()
    caps = await asyncio.get_running_loop().run_in_executor(
        None, cpucheck.probe, d.emulator, accel, models)
    cpucheck.check_cpu(d, caps, agent.settings.cpu_hide_features, agent.host)


async def expand_cpu(agent: HostAgent, d: DomainDef) -> DomainDef:
    """A host-model CPU as the named model and features of this host (workers/cpumodel.py)."""
    if d.cpu_mode != "host-model":
        return d
    accel = "kvm" if agent.kvm and d.type == "kvm" else "tcg"
    host = await asyncio.get_running_loop().run_in_executor(
        None, cpumodel.probe_host, d.emulator, accel)
    return cpumodel.expand_host_model(d, host, agent.settings.cpu_hide_features)


async def launch(agent: HostAgent, dom: DomainObj, definition: DomainDef,
                 incoming: str | None = None, extra_argv: Sequence[str] = ()) -> None:
    """Start QEMU for `definition` with CPUs stopped and connect its monitor.

    On any failure QEMU is gone again (and so are the taps made for it), the domain
    is shutoff:failed and the error carries the end of QEMU's log.
    """
    definition = with_nvram_path(definition, nvram_dir(agent))
    if incoming is None:  # an incoming guest keeps the CPU its source gave it
        definition = await expand_cpu(agent, definition)
    await check_cpu(agent, definition)
    ensure_nvram(definition, incoming=incoming is not None, host=agent.host)
    others = [o.current for o in agent.domains.values() if o.active and o is not dom]
    netdev.check_macs(definition, others, agent.host)
    live = with_channel_paths(_with_ports(agent, dom, definition), channel_dir(agent.store.run))
    dom.disk_claims = []
    try:
        dom.disk_claims = dac.claim_guest(agent.confinement, live)
        proc, live = _spawn(agent, dom, live, incoming, extra_argv)
    except BaseException:
        agent.release_ports(dom)
        dac.release_all(dom.disk_claims, restore=True)
        dom.disk_claims = []
        raise
    dom.live = live
    dom.exit_reason = ShutoffReason.FAILED  # until QEMU is up, an exit means start failed
    agent.watch(dom, proc)
    agent.set_state(dom, DomainState.PAUSED, PausedReason.STARTING_UP)
    mon = agent.make_monitor(dom)
    try:
        await mon.connect(str(agent.store.qmp_socket(live.uuid)),
                          agent.settings.qemu_start_timeout_s)
    except QemuError as exc:
        await agent.kill(dom, ShutoffReason.FAILED)
        raise QemuError(f"QEMU failed to start domain '{live.name}'", host=agent.host,
                        cause=log_tail(agent.store.qemu_log(live.name)) or exc.cause) from exc
    dom.monitor = mon
    dom.exit_reason = None


def _spawn(agent: HostAgent, dom: DomainObj, live: DomainDef, incoming: str | None,
           extra_argv: Sequence[str]) -> tuple[QemuProcess, DomainDef]:
    """QEMU started (as its user, if confined) with its monitor socket, taps, serial
    files and channel sockets handed over as fds; the worker writes its pidfile (QEMU's
    own -pidfile would need a directory a confined QEMU can write).  Returns `live`
    with the tap names the kernel gave."""
    taps: list[netdev.Tap] = []
    sock = None
    handover = Handover()
    try:
        taps = netdev.open_taps(live, agent.settings.networks, agent.host)
        live = with_tap_names(live, {t.index: t.name for t in taps})
        sock = listening_socket(agent.store.qmp_socket(live.uuid))
        handover = open_handover(live.serials, live.channels)
        dom.bound_sockets = bound_sockets(live.serials, live.channels)
        fds = {t.index: (t.fd, t.vhostfd) for t in taps}
        argv = build_qemu_argv(
            live, qmp_fd=sock.fileno(), kvm=agent.kvm, incoming=incoming,
            spice=qemu_has_spice(live.emulator), extra=extra_argv, taps=fds,
            sandbox=agent.settings.qemu_sandbox, handover=handover)
        log_path = agent.store.qemu_log(live.name)
        dom.log_offset = log_path.stat().st_size if log_path.exists() else 0
        tap_fds = [fd for pair in fds.values() for fd in pair if fd is not None]
        proc = spawn(argv, pass_fds=[sock.fileno(), *tap_fds, *handover.fds()],
                     log_path=log_path, cwd=agent.store.run, confinement=agent.confinement)
    except BaseException:
        remove_sockets(dom.bound_sockets)
        dom.bound_sockets = []
        netdev.discard(taps, agent.host)  # no QEMU: the macvtaps made for it go
        raise
    finally:
        for tap in taps:  # QEMU holds them now; a tap goes when QEMU does
            tap.close()
        if sock is not None:
            sock.close()
        close_handover(handover)
    atomic_write(agent.store.pidfile(live.name), f"{proc.pid}\n".encode(), 0o644,
                 durable=False)
    return proc, live


async def run_cpus(agent: HostAgent, dom: DomainObj, reason: RunningReason) -> None:
    """Start the CPUs, leases first.  A source resuming after a failed migration
    takes them back without the generation check (README, Leases)."""
    mon = dom.require_monitor("resume")
    agent.acquire_leases(dom, dom.lockstate,
                         check_state=reason != RunningReason.MIGRATION_CANCELED)
    dom.expected_resume = reason
    try:
        await mon.execute("cont")
    finally:
        dom.expected_resume = None
    agent.set_state(dom, DomainState.RUNNING, reason)


async def pause_cpus(agent: HostAgent, dom: DomainObj, reason: PausedReason) -> None:
    mon = dom.require_monitor("suspend")
    dom.expected_pause = reason
    try:
        await mon.execute("stop")
    finally:
        dom.expected_pause = None
    agent.set_state(dom, DomainState.PAUSED, reason)
    agent.release_leases(dom)


async def start(agent: HostAgent, name: str, paused: bool = False) -> dict[str, Any]:
    dom = agent.lookup(name)
    async with dom.lock:
        dom.require_inactive("start")
        if dom.definition is None:
            raise OperationInvalidError(f"cannot start: domain '{name}' has no definition")
        agent.allowed.check_domain(dom.definition)  # also a definition older than the policy
        agent.acquire_leases(dom)  # every lease or nothing starts
        try:
            await launch(agent, dom, dom.definition)
        except BaseException:
            agent.release_leases(dom)
            raise
        if paused:
            agent.set_state(dom, DomainState.PAUSED, PausedReason.USER)
            agent.release_leases(dom)
        else:
            await run_cpus(agent, dom, RunningReason.BOOTED)
        return dom.info(agent.host)


async def destroy(agent: HostAgent, name: str) -> dict[str, Any]:
    dom = agent.lookup(name)
    async with dom.lock:
        dom.require_active("destroy")
        await agent.kill(dom, ShutoffReason.DESTROYED)
        return dom.info(agent.host)


async def suspend(agent: HostAgent, name: str) -> dict[str, Any]:
    dom = agent.lookup(name)
    async with dom.lock:
        dom.require_state("suspend", DomainState.RUNNING)
        if dom.job is not None and dom.job.operation == JobOperation.OUTGOING_MIGRATION:
            # libvirt: pausing during migration lets it converge; the guest
            # still ends running on the dest.
            await pause_cpus(agent, dom, PausedReason.MIGRATION)
        else:
            dom.require_no_job("suspend")
            await pause_cpus(agent, dom, PausedReason.USER)
        return dom.info(agent.host)


async def resume(agent: HostAgent, name: str) -> dict[str, Any]:
    dom = agent.lookup(name)
    async with dom.lock:
        dom.require_no_job("resume")
        dom.require_state("resume", DomainState.PAUSED)
        await run_cpus(agent, dom, RunningReason.UNPAUSED)
        return dom.info(agent.host)


async def dominfo(agent: HostAgent, name: str) -> dict[str, Any]:
    return agent.lookup(name).info(agent.host)


async def list_domains(agent: HostAgent, all_: bool = False) -> list[dict[str, Any]]:
    doms = sorted(agent.domains.values(), key=lambda d: d.name)
    return [d.info(agent.host) for d in doms if all_ or d.active]


async def dumpxml(
    agent: HostAgent, name: str, inactive: bool = False, migratable: bool = False
) -> str:
    dom = agent.lookup(name)
    if inactive and dom.definition is not None:
        return format_domain_xml(dom.definition, migratable=migratable)
    return format_domain_xml(dom.current, live=dom.active and not migratable,
                             migratable=migratable)


def _disk(dom: DomainObj, device: str) -> Any:
    for disk in dom.current.disks:
        if device in (disk.target, disk.source):
            return disk
    raise NotFoundError(f"domain '{dom.name}' has no disk '{device}'")


async def domblkstat(agent: HostAgent, name: str, device: str | None = None) -> dict[str, Any]:
    dom = agent.lookup(name)
    mon = dom.require_monitor("get block stats")
    targets = [_disk(dom, device)] if device else list(dom.current.disks)
    stats = await mon.execute("query-blockstats")
    by_id = {s.get("device") or s.get("qdev", ""): s["stats"] for s in stats}
    by_qdev = {s.get("qdev", ""): s["stats"] for s in stats}
    out: dict[str, Any] = {}
    for disk in targets:
        s = by_id.get(disk.drive_id) or by_qdev.get(disk.device_id)
        if s is None:
            continue
        out[disk.target] = {
            "rd_req": s["rd_operations"],
            "rd_bytes": s["rd_bytes"],
            "wr_req": s["wr_operations"],
            "wr_bytes": s["wr_bytes"],
            "flush_operations": s["flush_operations"],
            "rd_total_times": s["rd_total_time_ns"],
            "wr_total_times": s["wr_total_time_ns"],
            "errs": s.get("failed_rd_operations", 0) + s.get("failed_wr_operations", 0),
        }
    return out


async def domblkinfo(agent: HostAgent, name: str, device: str) -> dict[str, Any]:
    dom = agent.lookup(name)
    disk = _disk(dom, device)
    if not disk.source:
        raise OperationInvalidError(f"disk '{device}' has no source")
    try:
        st = os.stat(disk.source)
    except OSError as exc:
        raise NotFoundError(f"cannot stat disk '{device}': {exc.strerror}") from exc
    info = {
        "target": disk.target,
        "path": disk.source,
        "physical": st.st_size,
        "allocation": st.st_blocks * 512,
        "capacity": st.st_size,
    }
    if dom.active and dom.monitor is not None:
        for blk in await dom.monitor.execute("query-block"):
            image = (blk.get("inserted") or {}).get("image") or {}
            if blk.get("device") == disk.drive_id or blk.get("qdev") == disk.device_id:
                info["capacity"] = image.get("virtual-size", st.st_size)
    elif disk.format != "raw":
        info["capacity"] = await _image_virtual_size(disk.source)
    return info


async def _image_virtual_size(path: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        "info",
        "-U",
        "--output=json",
        path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    if proc.returncode != 0:
        raise QemuError(f"qemu-img info failed for {path}", cause=err.decode().strip())
    return int(json.loads(out)["virtual-size"])


async def monitor_command(agent: HostAgent, name: str, command: str, hmp: bool = False) -> Any:
    dom = agent.lookup(name)
    mon = dom.require_monitor("run a monitor command")
    if hmp:
        return await mon.execute("human-monitor-command", {"command-line": command})
    with contextlib.suppress(ValueError):
        if not isinstance(json.loads(command), dict):
            raise InvalidInputError("a QMP command must be a JSON object")
        return await mon.execute_raw(command)
    raise InvalidInputError('a QMP command must be JSON, e.g. {"execute": "query-status"}')


async def domlocks(agent: HostAgent, name: str) -> dict[str, Any]:
    """The leases of a domain and who holds them (ferry domlocks)."""
    dom = agent.lookup(name)
    return {"driver": agent.locks.driver, "held_here": dom.leases_held,
            "lockstate": dom.lockstate, "leases": agent.locks.holders(dom.current)}
