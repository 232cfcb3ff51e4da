"""The QEMU side of a migration: capabilities, parameters, migrate, the wait loop.

The wait loop wakes on QMP MIGRATION events, on the QEMU process exiting,
and at least every PROGRESS_INTERVAL_S to refresh the job's progress, so it
never sleeps through a state change and never polls blindly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from workers import failpoints
from workers.domobj import DomainObj
from workers.errors import FerryError, MigrationError, QemuError
from workers.migration import stream_caps, tunnel
from workers.migration.cookie import CookieStatistics, quoted
from workers.migration.params import UNLIMITED_BANDWIDTH_BYTES, MigrationParams
from workers.monitor import Monitor

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25
ACTIVE = ("setup", "active", "pre-switchover", "device", "postcopy-active",
          "postcopy-paused", "postcopy-recover", "wait-unplug", "cancelling")


UNLIMITED = UNLIMITED_BANDWIDTH_BYTES


def mib_to_bytes(mib: int) -> int:
    """A bandwidth in MiB/s as QEMU's max-bandwidth; 0 means unlimited."""
    return mib * 1024 * 1024 if mib else UNLIMITED


async def setup(mon: Monitor, params: MigrationParams, *, outgoing: bool, two_way: bool = True,
                bandwidth_mib_s: int | None = None, downtime_ms: int | None = None,
                tls: Mapping[str, str] | None = None) -> None:
    """Capabilities and the stream's parameters on both ends (workers/migration/
    stream_caps.py); bandwidth and downtime on the source; `tls` (the tls-creds and
    tls-hostname parameters) on both, set even when empty, so a QEMU that once
    migrated with TLS never carries it into a plain migration.  A TLS stream always
    has the return path (it is direct TCP, never a tunnel): with TLS 1.3 the source's
    handshake is over before the dest checks its client certificate, and the return
    path makes the source wait for the dest's word."""
    caps = stream_caps.capabilities(params, outgoing=outgoing, two_way=two_way)
    await mon.execute("migrate-set-capabilities", {"capabilities": stream_caps.as_qmp(caps)})
    mparams: dict[str, Any] = {"tls-creds": "", "tls-hostname": "", **(tls or {}),
                               **stream_caps.parameters(params)}
    if outgoing:
        bw = params.bandwidth_mib_s if bandwidth_mib_s is None else bandwidth_mib_s
        mparams["max-bandwidth"] = mib_to_bytes(bw)
        if downtime_ms:
            mparams["downtime-limit"] = downtime_ms
    await mon.execute("migrate-set-parameters", mparams)


#: query-migrate statuses in which libvirt reads the ram/disk/xbzrle figures
_FIGURES_STATUSES = frozenset({
    "active", "postcopy-active", "postcopy-paused", "postcopy-recover-setup", "postcopy-recover",
    "completed", "cancelling", "pre-switchover", "device"})
#: query-migrate part -> (field prefix, required keys, optional keys), as libvirt maps them
_QUERY_PARTS: dict[str, tuple[str, dict[str, str], dict[str, str]]] = {
    "ram": ("memory_", {"transferred": "processed", "remaining": "remaining", "total": "total"},
            {"duplicate": "constant", "normal": "normal", "normal-bytes": "normal_bytes",
             "dirty-pages-rate": "dirty_rate", "page-size": "page_size",
             "dirty-sync-count": "iteration", "postcopy-requests": "postcopy_requests"}),
    "disk": ("disk_", {"transferred": "processed", "remaining": "remaining", "total": "total"},
             {}),
    "xbzrle-cache": ("compression_", {"cache-size": "cache", "bytes": "bytes", "pages": "pages",
                                      "cache-miss": "cache_misses", "overflow": "overflow"}, {}),
}


def _qnum(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise MigrationError(f"query-migrate reply: {key!r} is {quoted(value)}, not an integer")
    return value


def statistics_from_query_migrate(
    info: Mapping[str, Any], *, started_ms: int, stopped_ms: int, sent_ms: int | None = None
) -> CookieStatistics:
    """Map QEMU's ``query-migrate`` reply (or its ``return``) to libvirt's statistics.

    As libvirt's qemuMonitorJSONGetMigrationStatsReply: downtime is
    ``downtime`` once completed, ``expected-downtime`` before; ram, disk and
    xbzrle figures only in an active or completed status; bps = mbps * 10^6/8.
    time_elapsed = stopped - started (libvirt's clock); sent defaults to stopped.
    """
    ret: Mapping[str, Any] = info["return"] if "status" not in info and "return" in info else info
    if not isinstance(status := ret.get("status"), str):
        raise MigrationError("query-migrate reply has no status")
    v: dict[str, int | None] = {
        "started": started_ms, "stopped": stopped_ms,
        "sent": stopped_ms if sent_ms is None else sent_ms,
        "time_elapsed": max(0, stopped_ms - started_ms),
        "downtime": _qnum(ret, "downtime" if status == "completed" else "expected-downtime"),
        "setup_time": _qnum(ret, "setup-time"),
        "auto_converge_throttle": _qnum(ret, "cpu-throttle-percentage"),
    }
    for key, (prefix, required, optional) in _QUERY_PARTS.items():
        if status not in _FIGURES_STATUSES or not isinstance(part := ret.get(key), Mapping):
            continue
        for qkey, suffix in (required | optional).items():
            v[prefix + suffix] = _qnum(part, qkey)
            if v[prefix + suffix] is None and qkey in required:
                raise MigrationError(f"query-migrate reply: migration is {status} but "
                                     f"{key} {qkey!r} is missing")
        mbps = part.get("mbps")
        if key != "xbzrle-cache" and isinstance(mbps, int | float) and not isinstance(mbps, bool) \
                and 0 < mbps < 1e15:
            v[prefix + "bps"] = int(mbps * (1000 * 1000 // 8))  # QEMU's mbps: 10^6 bits/s
    return CookieStatistics(**{k: x for k, x in v.items() if x is not None})


def progress_of(info: dict[str, Any], started_ms: int) -> dict[str, Any]:
    """libvirt-named statistics from a query-migrate reply (empty before setup)."""
    if info.get("status") not in (*ACTIVE, "completed"):
        return {}
    try:
        stats = statistics_from_query_migrate(info, started_ms=started_ms,
                                              stopped_ms=int(time.time() * 1000))
    except MigrationError:
        return {}
    return {"status": info.get("status"), **stats.as_dict()}


async def wait(dom: DomainObj, mon: Monitor, *, started_ms: int,
               on_progress: Callable[[dict[str, Any]], None],
               on_tick: Callable[[float], None] | None = None,
               on_failed: Callable[[str | None], FerryError | None] | None = None,
               at_switchover: Callable[[], Awaitable[None]] | None = None,
               until_postcopy: bool = False) -> dict[str, Any]:
    """Wait for the migration on `mon` to end; the final query-migrate reply on success.

    `on_failed` may tell a failure (QEMU's error-desc, None when it gave none) better.
    With pause-before-switchover on, QEMU stops at `pre-switchover` (the guest paused)
    until `at_switchover` has run; then the migration continues.
    `until_postcopy`: a switch into post-copy ends the wait too (libvirt's
    QEMU_MIGRATION_COMPLETED_POSTCOPY): the dest must run the guest while the
    rest of its memory comes, so Perform hands over to Finish there.
    """
    t0 = time.monotonic()
    continued = False
    while True:
        if not dom.active:
            raise MigrationError(f"QEMU of '{dom.name}' exited during migration")
        dom.wakeup.clear()
        try:
            info = await mon.execute("query-migrate")
        except QemuError:
            if await dom.gone_within():
                raise MigrationError(f"QEMU of '{dom.name}' exited during migration") from None
            raise
        status = info.get("status", "none")
        on_progress(progress_of(info, started_ms))
        if status == "completed" or (until_postcopy and status == "postcopy-active"):
            return dict(info)
        if status in ("failed", "cancelled") and dom.job is not None and dom.job.abort:
            # An abort closes a tunnel before it cancels: QEMU may see the broken pipe
            # first and say "failed"; either way the operator's abort is the cause.
            raise MigrationError("operation aborted: migration job canceled by client")
        if status == "failed":
            told = on_failed(info.get("error-desc")) if on_failed is not None else None
            if told is not None:
                raise told
            desc = info.get("error-desc", "unknown error")
            if dom.tunnel is not None and dom.tunnel.error:  # QEMU only saw its socket close
                desc = f"{desc} (the tunnel through the broker broke: {dom.tunnel.error})"
            raise MigrationError(f"migration failed: {desc}")
        if status == "cancelled":
            raise MigrationError("migration was cancelled")
        if status == "pre-switchover" and not continued:
            await switch_over(dom, mon, at_switchover)
            continued = True
            continue
        if on_tick is not None:
            on_tick(time.monotonic() - t0)
        await nap(dom)


async def wait_postcopy_end(dom: DomainObj, timeout_s: float) -> dict[str, Any] | None:
    """After a switch into post-copy: QEMU's last query-migrate reply once every page has
    gone (the source's QEMU must live until then), None if it did not end in time."""
    mon = dom.monitor
    deadline = time.monotonic() + timeout_s
    while mon is not None and dom.active and time.monotonic() < deadline:
        dom.wakeup.clear()
        info = await mon.execute("query-migrate")
        if not str(info.get("status", "")).startswith("postcopy"):
            return dict(info)
        await nap(dom)
    return None
async def switch_over(dom: DomainObj, mon: Monitor,
                      at_switchover: Callable[[], Awaitable[None]] | None = None) -> None:
    """QEMU has stopped the guest and waits (pause-before-switchover): run `at_switchover`
    (the storage copy's mirrors) and the job's switch-over hooks, then let it send the
    rest.  Everything here adds to the guest's pause; an abort that came meanwhile
    cancels instead (the source resumes)."""
    job = dom.job
    await failpoints.hit("perform3.switchover")
    if at_switchover is not None:
        await at_switchover()
    for hook in job.switchover_hooks if job is not None else ():
        await hook()
    if job is not None and job.abort:
        raise MigrationError("operation aborted: migration job canceled by client")
    await mon.execute("migrate-continue", {"state": "pre-switchover"})


async def nap(dom: DomainObj) -> None:
    """Until the next MIGRATION event or process exit, or PROGRESS_INTERVAL_S at most."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(dom.wakeup.wait(), PROGRESS_INTERVAL_S)


TUNNEL_FD = "ferry-tunnel"


async def pass_socket(mon: Monitor, name: str) -> socket.socket:
    """One end of a new socketpair handed to QEMU as fd `name`; the other end is ours."""
    ours, theirs = tunnel.stream_pair()
    try:
        mon.send_fd(theirs.fileno())
        await mon.execute("getfd", {"fdname": name})
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()  # QEMU holds its copy; ours must go or EOF never comes
    return ours


async def cancel(dom: DomainObj) -> None:
    """Best effort: stop an outgoing migration that is still running.

    A tunnel's ends close at the same time, in a thread: QEMU blocked on a full
    socket would not see the cancel before its socket is shut down (the close's
    first step), and the close then flags it in Redis for the other side, a
    round trip (a new connection, often) the cancel need not wait for.
    """
    closing = None
    if dom.tunnel is not None:
        closing = asyncio.get_running_loop().run_in_executor(None, dom.tunnel.close)
    try:
        if dom.monitor is not None:
            await dom.monitor.execute("migrate_cancel", timeout=10)
    except QemuError as exc:
        log.warning("domain %s: migrate_cancel failed: %s", dom.name, exc)
    finally:
        if closing is not None:
            await closing
