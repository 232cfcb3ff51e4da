"""Migration phases on the destination host: Prepare, Finish (v3 and v2).

Prepare starts QEMU with `-incoming defer` and opens a port of this host's
range on its migration address; Finish waits for the stream to complete,
starts the CPUs and persists the definition, or, cancelled, kills the
incoming QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import replace
from typing import Any, Literal

from workers import confine, failpoints
from workers.agent import HostAgent
from workers.domain import DomainDef
from workers.domain_states import DomainState, PausedReason, RunningReason, ShutoffReason
from workers.domain_xml import format_domain_xml
from workers.domobj import DomainObj
from workers.errors import FerryError, InvalidInputError, MigrationError, QemuError
from workers.hostcaps import check_same_cpu, cpu_signature, require_postcopy
from workers.job_types import JobOperation, Phase
from workers.jobs import ActiveJob
from workers.lifecycle import inactive_domain_for, launch, run_cpus
from workers.migration import qemu_migrate, storage_dest, stream_stats, tls, tunnel
from workers.migration.chain_state import MigrationState
from workers.migration.cookie import Cookie, CookieGraphics, make_cookie, parse
from workers.migration.guards import check_abort, refuse_v2_with_lease_state
from workers.migration.params import MigrationFlags as F
from workers.migration.params import MigrationParams, format_qemu_uri, parse_qemu_uri
from workers.migration.tunnel_ends import DestEnds, socket_path
from workers.pki import Role

log = logging.getLogger(__name__)


def _incoming_dom(agent: HostAgent, d: DomainDef) -> DomainObj:
    """The object the incoming guest lives in: new, or an inactive definition of it here."""
    return inactive_domain_for(agent, d, "migrate in") or DomainObj(definition=None)


def _check_listen_address(agent: HostAgent, scheme: str, host: str) -> None:
    """Before QEMU starts: a --migrateuri host must resolve here, a unix socket must go
    where files may go (FERRY_ALLOWED_DIRS)."""
    if scheme == "unix":
        agent.allowed.check(host, "migration URI socket")
        return
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InvalidInputError(f"migration URI host '{host}' is unknown on host "
                                f"{agent.host}: {reason}") from None


def _listen_host(agent: HostAgent, p: MigrationParams) -> str:
    """The address the source will dial: a --migrateuri's host, or this host's own."""
    return parse_qemu_uri(p.migrate_uri)[1] if p.migrate_uri else \
        agent.settings.migration_address


def _listen_uri(agent: HostAgent, dom: DomainObj, p: MigrationParams) -> str:
    scheme, host, port = ("tcp", agent.settings.migration_address, None)
    if p.migrate_uri:
        scheme, host, port = parse_qemu_uri(p.migrate_uri)
        _check_listen_address(agent, scheme, host)
    if scheme == "tcp" and port is None:
        port = agent.migration_ports.acquire(host)
        dom.ports.append(("migration", port))
    return format_qemu_uri(scheme, host, port)


def _graphics_cookie(d: DomainDef, address: str) -> CookieGraphics | None:
    for g in d.graphics:
        if g.port is None:
            continue
        listen = g.listen if g.listen and g.listen not in ("0.0.0.0", "::") else address
        kind: Literal["spice", "vnc"] = "spice" if g.type == "spice" else "vnc"
        return CookieGraphics(kind, g.port, g.tls_port if g.tls_port else -1, listen)
    return None


async def prepare(agent: HostAgent, st: MigrationState, *, v3: bool) -> MigrationState:
    p = st.params
    if st.failed:
        return st  # an earlier phase failed: nothing to prepare
    again = agent.domains.get(p.domain)
    if again is not None and again.job is not None and again.job.id == p.job_id and \
            again.job.state is not None and again.active:
        return again.job.state  # redelivered: the same answer
    await failpoints.hit("prepare3.start")
    cookie_in = None
    if v3:
        cookie_in = parse(st.cookie or "", local_hostuuid=agent.uuid)
    else:
        refuse_v2_with_lease_state(agent)  # refuses same host, bad features
    if st.xml is None:
        raise MigrationError("no domain definition reached Prepare")
    d = agent.parse(st.xml)
    if p.has(F.POSTCOPY):
        require_postcopy(agent.confinement is not None)
    check_same_cpu(d, st.source_cpu, cpu_signature(agent.settings.cpu_hide_features),
                   p.has(F.UNSAFE))
    tls.check_material(agent, p, Role.SERVER, _listen_host(agent, p))
    check_abort(agent, None, d.uuid, p.job_id)
    dom = _incoming_dom(agent, d)
    agent.domains[d.name] = dom
    if dom.definition is None:
        dom.live = d  # a transient object needs a definition to be named by
    dom.job = ActiveJob(p.job_id, JobOperation.INCOMING_MIGRATION, Phase.PREPARE, time.time(),
                        source=p.source, dest=p.dest, flags=p.flags)
    if not v3:  # v2 has no Begin: the job's record starts here, so an abort has a place to go
        agent.jobs.start(d.uuid, job_id=p.job_id, kind=JobOperation.INCOMING_MIGRATION.kind,
                         phase=Phase.PREPARE, source=p.source, dest=p.dest, flags=p.flags)
    try:
        agent.jobs.set_phase(d.uuid, p.job_id, Phase.PREPARE)  # may need a replica
        uri = None
        if p.storage_copy:
            dom.storage_in = await storage_dest.prepare_images(
                agent, d, cookie_in.nbd if cookie_in else None, p)
        if not p.has(F.OFFLINE):
            uri = await _start_incoming(agent, dom, d, p)
    except BaseException:
        await _discard(agent, dom)
        raise
    storage = dom.storage_in
    cookie = make_cookie(d.name, d.uuid, agent.host, agent.uuid,
                         graphics=_graphics_cookie(dom.current, agent.settings.migration_address),
                         nbd=storage.cookie() if storage else None,
                         mandatory=("nbd",) if storage else ())
    st = replace(st, cookie=cookie.to_xml() if v3 else None, uri=uri)
    dom.job.state = st
    if dom.active:
        agent.save_status(dom)
    await failpoints.hit("prepare3.end")
    return st


async def _start_incoming(agent: HostAgent, dom: DomainObj, d: DomainDef,
                          p: MigrationParams) -> str:
    tunnelled = p.has(F.TUNNELLED)
    uri = f"tunnel:{p.job_id}" if tunnelled else _listen_uri(agent, dom, p)
    await launch(agent, dom, d, incoming="defer",
                 extra_argv=failpoints.extra_argv("prepare3.qemu_argv"))
    agent.set_state(dom, DomainState.PAUSED, PausedReason.MIGRATION)
    mon = dom.require_monitor("migrate in")
    creds: dict[str, str] = {}
    if p.has(F.TLS):  # the dest names no host: it checks the source's client certificate
        creds = {"tls-creds": await tls.add_creds(agent, dom, Role.SERVER), "tls-hostname": ""}
    await qemu_migrate.setup(mon, p, outgoing=False, tls=creds)
    if dom.storage_in is not None:
        await storage_dest.start_nbd(agent, dom, mon, dom.storage_in, p,
                                     tls_creds=creds.get("tls-creds"))
    if tunnelled:
        await _tunnel_in(agent, dom, p, mon)
    else:
        uri = await _listen(agent, dom, p, mon, uri)
    return uri


async def _tunnel_in(agent: HostAgent, dom: DomainObj, p: MigrationParams, mon: Any) -> None:
    """The dest's end of the tunnel: QEMU reads one socketpair, or listens on a unix
    socket for the parallel channels the receivers connect (tunnel_ends.py)."""
    channels = p.channels + 1 if p.channels else 1
    tunnel.reset(agent.redis, p.job_id, channels)
    if p.channels:
        path = socket_path(confine.socket_dir(agent.confinement, agent.store.run), "in",
                           p.job_id)
        dom.tunnel = DestEnds(agent.settings, p.job_id, channels=channels, path=path)
        await mon.execute("migrate-incoming", {"uri": f"unix:{path}"})
    else:
        sock = await qemu_migrate.pass_socket(mon, qemu_migrate.TUNNEL_FD)
        dom.tunnel = DestEnds(agent.settings, p.job_id, channels=1, sock=sock)
        await mon.execute("migrate-incoming", {"uri": f"fd:{qemu_migrate.TUNNEL_FD}"})
    dom.tunnel.start()


async def _listen(agent: HostAgent, dom: DomainObj, p: MigrationParams, mon: Any,
                  uri: str) -> str:
    """migrate-incoming on `uri`; another port of the range if this one was taken
    meanwhile (hosts sharing an address pick from the same range)."""
    for _ in range(5):
        try:
            await mon.execute("migrate-incoming", {"uri": uri})
            return uri
        except QemuError as exc:
            if "in use" not in str(exc) or p.migrate_uri:
                raise
            log.info("port of %s taken meanwhile, trying another", uri)
            uri = _listen_uri(agent, dom, p)
    raise MigrationError("no free incoming migration port after 5 tries")


async def _end_tunnel(dom: DomainObj, close: bool) -> None:
    pump, dom.tunnel = dom.tunnel, None
    if pump is None:
        return
    if close:
        pump.close()
    await asyncio.get_running_loop().run_in_executor(None, pump.finish, 10.0)


async def _discard(agent: HostAgent, dom: DomainObj, *, keep: bool = False) -> None:
    """Undo Prepare: the incoming QEMU goes, images it created go (with `keep`, the
    source reported the failure: a cleanly stopped copy's images are kept for a retry),
    an object we made goes, the job ends."""
    await _end_tunnel(dom, close=True)
    kept = keep and await storage_dest.ready_to_keep(agent, dom)
    if dom.active:
        await agent.kill(dom, ShutoffReason.FAILED)
    agent.release_ports(dom)
    if dom.job is not None and kept:
        storage_dest.keep_for_retry(agent, dom.job.id, dom.storage_in, dom.uuid,
                                    dom.job.source or "")
    elif dom.job is not None:
        storage_dest.discard_images(agent, dom.job.id)
    dom.storage_in = None
    dom.job = None
    if not dom.persistent and not dom.active and agent.domains.get(dom.name) is dom:
        agent.domains.pop(dom.name)


def _known_cause(agent: HostAgent, st: MigrationState) -> str:
    """What the job record says happened (e.g. a restarted worker found the QEMU gone)."""
    try:
        uuid = agent.parse(st.xml or "").uuid
    except FerryError:
        return ""
    rec = agent.jobs.get(uuid)
    error = rec.get("error") if rec is not None and rec.get("id") == st.params.job_id else None
    if isinstance(error, dict) and error.get("message"):
        return f" ({error.get('message')})"
    stream = tunnel.broken(agent.redis, st.params.job_id) if st.params.has(F.TUNNELLED) \
        else None
    return f" (the tunnel broke: {stream})" if stream else ""


def _job_dom(agent: HostAgent, p: MigrationParams) -> DomainObj | None:
    dom = agent.domains.get(p.domain)
    if dom is None or dom.job is None or dom.job.id != p.job_id:
        return None
    return dom


async def finish(agent: HostAgent, st: MigrationState, *, v3: bool) -> MigrationState:
    p = st.params
    dom = _job_dom(agent, p)
    phase = Phase.FINISH3 if v3 else Phase.FINISH2
    if dom is None:
        if st.failed:
            # Prepare never got as far as a QEMU here, or it exited: images it made go
            storage_dest.discard_images(agent, p.job_id)
            if not v3:  # v2's record started in Prepare; no Confirm will end it
                with contextlib.suppress(FerryError):
                    agent.jobs.end(agent.parse(st.xml or "").uuid, p.job_id)
            return st
        raise MigrationError(f"no incoming migration {p.job_id} of '{p.domain}' on this host: "
                             f"its incoming QEMU exited or was discarded{_known_cause(agent, st)}")
    assert dom.job is not None
    dom.job.phase = phase
    uuid = dom.uuid
    agent.jobs.set_phase(uuid, p.job_id, phase)
    try:
        st = await _finish(agent, dom, st, v3)
    except FerryError as exc:
        if v3 or st.failed:
            raise
        raise MigrationError(f"{exc.message}{V2_LOST}", cause=exc.cause) from exc
    finally:
        if not v3:  # v2 has no Confirm: the job ends here
            agent.jobs.end(uuid, p.job_id)
    return st


#: v2 Perform killed the source once QEMU completed: a Finish failure loses the guest
V2_LOST = ("; the guest is lost: protocol v2 has no Confirm, the source's QEMU was stopped "
           "after Perform")


async def _finish(agent: HostAgent, dom: DomainObj, st: MigrationState,
                  v3: bool) -> MigrationState:
    p = st.params
    if st.failed:
        st = tls.dest_verdict(agent, dom, st)
        await _discard(agent, dom, keep=True)
        return st
    # v3's fence against a source that gave up waiting (tasks/p2p.py); v2's source is
    # already gone, so its Finish must go on whatever happens.
    try:
        winner = agent.jobs.claim_finish(dom.uuid, p.job_id, "dest") if v3 else "dest"
    except FerryError:  # no replica has the claim (Sentinel): the CPUs must not start
        await _discard(agent, dom)
        raise
    if winner != "dest":
        await _discard(agent, dom)
        raise MigrationError("the source gave up waiting for Finish: the incoming guest was "
                             "discarded")
    try:
        st = await _finish_ok(agent, dom, st, v3)
    except BaseException:
        await _discard(agent, dom)
        raise
    if not p.has(F.OFFLINE) and not await _still_alive(dom):
        # It may have run here and written to its disks: the source must not resume.
        await _discard(agent, dom)
        what = f"the incoming QEMU exited ({dom.reason.value}) after its CPUs started"
        err = MigrationError(f"{what}: the source stays paused, the guest may have run here",
                             Phase.FINISH3, agent.host) if v3 else \
            MigrationError(f"{what}{V2_LOST}", Phase.FINISH2, agent.host)
        return replace(st, outcome_unknown=True).with_error(err)
    await tls.remove_creds(dom)
    return complete_incoming(agent, dom, st)


async def _still_alive(dom: DomainObj) -> bool:
    """A QMP round trip, so a QEMU killed a moment ago is not taken for alive while its
    exit is still on its way to the agent (Confirm would then kill the source)."""
    if not dom.active or dom.monitor is None:
        return False
    try:
        await dom.monitor.execute("query-status", timeout=5)
    except QemuError:
        return not await dom.gone_within()
    return True


def complete_incoming(agent: HostAgent, dom: DomainObj, st: MigrationState) -> MigrationState:
    """The dest's part of the job is over, the guest is here: Finish's answer."""
    info = dom.info(agent.host)
    _complete(agent, dom, st)
    if dom.storage_in is not None or st.params.storage_copy:
        storage_dest.keep_images(agent, st.params.job_id)  # they are the guest's disks now
    dom.storage_in = None
    dom.job = None
    agent.release_ports(dom)
    if dom.active:
        agent.save_status(dom)  # no job left in the status file
    return replace(st, result=info)


async def _finish_ok(agent: HostAgent, dom: DomainObj, st: MigrationState,
                     v3: bool) -> MigrationState:
    """Complete the incoming side; the state returned carries the source's statistics."""
    p = st.params
    await failpoints.hit("finish3.start")
    cookie = parse(st.cookie, expect_uuid=dom.uuid) if v3 and st.cookie else None
    if cookie is not None and cookie.statistics is not None:
        # ferry's own figures (channels, compression, the STOP time) travel beside the
        # cookie's libvirt-named ones, in the chain's state
        st = replace(st, statistics={**st.statistics, **cookie.statistics.as_dict()})
    if p.storage_copy:
        await storage_dest.stop_nbd(dom)  # before the CPUs start, as libvirt
    if not p.has(F.OFFLINE):
        await _wait_incoming(agent, dom, postcopy=p.has(F.POSTCOPY))
        await _end_tunnel(dom, close=False)
    if p.has(F.PERSIST_DEST):
        xml = (cookie.persistent if cookie and cookie.persistent else None) or st.xml
        assert xml is not None
        definition = agent.parse(xml)
        agent.store.save_definition(definition.name, format_domain_xml(definition))
        dom.definition = definition
    if p.has(F.OFFLINE):
        return st
    await failpoints.hit("finish3.before_cont")
    dom.lockstate = _lockstate(agent, cookie)
    if st.was_running and not p.has(F.PAUSED):
        # No announce-self here: QEMU announces every NIC when the incoming stream
        # completes (RARP; a virtio-net guest is asked to send its own gratuitous ARP
        # as soon as its CPUs run); another round would only repeat it.
        before = time.time()
        await run_cpus(agent, dom, RunningReason.MIGRATED)  # takes the leases first
        # QEMU sends RESUME before `cont`'s reply, so its time is known here
        pause = stream_stats.guest_pause_ms(st.statistics, dom.cpu_events.get("RESUME"),
                                            before)
        if pause is not None:
            st = replace(st, statistics={**st.statistics, "guest_pause_ms": pause})
    else:
        agent.set_state(dom, DomainState.PAUSED, PausedReason.USER)
    if p.has(F.POSTCOPY):
        await _wait_incoming(agent, dom)  # the guest runs here while its last pages come
    await failpoints.hit("finish3.after_cont")
    return st


def _lockstate(agent: HostAgent, cookie: Cookie | None) -> str | None:
    """The lease state the source handed over; refused if our lock manager differs."""
    if cookie is None or cookie.lockstate is None:
        return None
    if cookie.lockstate.driver != agent.locks.driver:
        raise MigrationError(f"lock manager '{cookie.lockstate.driver}' of the source does "
                             f"not match this host's '{agent.locks.driver}'")
    return cookie.lockstate.leases or None


async def _wait_incoming(agent: HostAgent, dom: DomainObj, postcopy: bool = False) -> None:
    """Until the incoming migration completed, or (`postcopy`) switched into post-copy."""
    if not dom.active:
        raise MigrationError(f"the incoming QEMU exited ({dom.reason.value}) before the "
                             "migration completed")
    mon = dom.require_monitor("finish migration")
    deadline = time.monotonic() + agent.settings.incoming_timeout_s
    while True:
        if not dom.active:
            raise MigrationError("the incoming QEMU exited before the migration completed")
        dom.wakeup.clear()
        try:
            status = (await mon.execute("query-migrate")).get("status", "none")
        except QemuError:
            if await dom.gone_within():
                raise MigrationError("the incoming QEMU exited before the migration "
                                     "completed") from None
            raise
        if status == "completed" or (postcopy and status == "postcopy-active"):
            return
        if status in ("failed", "cancelled"):
            raise MigrationError(f"incoming migration {status}")
        if time.monotonic() > deadline:
            raise MigrationError("incoming migration did not complete in "
                                 f"{agent.settings.incoming_timeout_s}s")
        await qemu_migrate.nap(dom)


def _complete(agent: HostAgent, dom: DomainObj, st: MigrationState) -> None:
    p = st.params
    job = dom.job
    info = {"id": p.job_id, "operation": JobOperation.INCOMING_MIGRATION, "source": p.source,
            "dest": p.dest, "type": "completed", "statistics": st.statistics,
            "time_elapsed_ms": int((time.time() - job.started) * 1000) if job else 0,
            "error": None}
    agent.jobs.complete(dom.uuid, agent.host, info)

