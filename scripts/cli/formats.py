"""Human output of the CLI, virsh-like.  `--json` bypasses all of this."""

from __future__ import annotations

import datetime
import json
from typing import Any


def dominfo(info: dict[str, Any]) -> str:
    rows = [
        ("Name", info["name"]), ("UUID", info["uuid"]), ("Host", info["host"]),
        ("State", info["state"]), ("Reason", info["reason"]),
        ("PID", info["pid"] if info["pid"] else "-"),
        ("Max memory", f"{info['memory_kib']} KiB"),
        ("Used memory", f"{info['current_memory_kib']} KiB"),
        ("CPU(s)", info["vcpus"]), ("Persistent", "yes" if info["persistent"] else "no"),
    ]
    return "\n".join(f"{k + ':':<16}{v}" for k, v in rows)


def domain_list(items: list[dict[str, Any]]) -> str:
    header = f" {'Name':<24} {'State':<10} {'Reason':<20} {'PID':>8}"
    lines = [header, "-" * len(header)]
    for d in items:
        lines.append(f" {d['name']:<24} {d['state']:<10} {d['reason']:<20} "
                     f"{d['pid'] or '-':>8}")
    return "\n".join(lines)


def _tls(h: dict[str, Any]) -> str:
    """yes / required / no, and the date the first certificate expires."""
    if not h.get("tls"):
        return "no" if h.get("alive") else "-"
    word = "required" if h.get("tls_required") else "yes"
    return f"{word} {h['tls_expires'][:10]}" if h.get("tls_expires") else word


def hosts(items: list[dict[str, Any]]) -> str:
    header = (f" {'Name':<16} {'Alive':<6} {'Address':<16} {'UUID':<36}  "
              f"{'TLS (expires)':<20} Guests")
    lines = [header, "-" * len(header)]
    for h in items:
        lines.append(f" {h['name']:<16} {'yes' if h['alive'] else 'no':<6} "
                     f"{h['address'] or '-':<16} {h['uuid'] or '-':<36}  {_tls(h):<20} "
                     f"{', '.join(h['guests']) or '-'}")
    return "\n".join(lines)


TLS_WARNING_DAYS = 30


def tls_warnings(items: list[dict[str, Any]], now: datetime.datetime | None = None,
                 days: int = TLS_WARNING_DAYS) -> list[str]:
    """A line per live host whose migration TLS certificates expire within `days` (or
    whose material is broken): `ferry hosts` prints them on stderr."""
    now = now or datetime.datetime.now(datetime.UTC)
    out = []
    for h in items:
        if not h.get("alive"):
            continue
        for problem in h.get("tls_problems") or []:
            out.append(f"warning: host {h['name']}: {problem}")
        expires = h.get("tls_expires")
        if not expires:
            continue
        left = datetime.datetime.fromisoformat(expires) - now
        if left < datetime.timedelta(days=days):
            when = "expired" if left.total_seconds() <= 0 else f"expire in {left.days} days"
            out.append(f"warning: host {h['name']}: migration TLS certificates {when} "
                       f"({expires[:16].replace('T', ' ')} UTC)")
    return out


def blkstat(stats: dict[str, Any]) -> str:
    lines: list[str] = []
    for dev, s in stats.items():
        lines.extend(f"{dev} {k} {v}" for k, v in s.items())
    return "\n".join(lines)


def blkinfo(info: dict[str, Any]) -> str:
    return "\n".join(f"{k.capitalize() + ':':<16}{info[k]}"
                     for k in ("capacity", "allocation", "physical"))


def as_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)


def jobinfo(info: dict[str, Any]) -> str:
    rows = [("Job type", info["type"])]
    if info["type"] != "none":
        rows += [(k.replace("_", " ").capitalize(), info[k]) for k in (
            "operation", "phase", "time_elapsed_ms", "data_total", "data_processed",
            "data_remaining", "disk_total", "disk_processed", "disk_remaining", "disk_bps",
            "memory_bps", "memory_dirty_rate", "memory_iteration",
            "downtime_ms", "setup_time_ms", "guest_pause_ms", "parallel_connections",
            "compression_methods", "compression_cache", "compression_bytes",
            "compression_pages", "compression_cache_hits", "compression_cache_misses",
            "compression_overflow", "stream_bytes", "queue", "queue_position", "error")
            if info.get(k) is not None]
    return "\n".join(f"{k + ':':<26}{','.join(v) if isinstance(v, list) else v}"
                     for k, v in rows)


def migration_summary(s: dict[str, Any]) -> str:
    st = s.get("statistics") or {}
    lines = [f"Migration {s['job_id']}: {s['domain']} {s['source']} -> {s['dest']}: "
             f"{s['result']}"]
    for ph in s.get("phases", []):
        lines.append(f"  {ph['phase']:<10} on {ph['host']:<10} {ph['elapsed_ms']:>9.1f} ms")
    if st:
        mib = st.get("memory_processed", 0) / 1048576
        lines.append(f"  transferred {mib:.1f} MiB, downtime {st.get('downtime')} ms, "
                     f"{st.get('memory_bps', 0) / 1048576:.0f} MiB/s")
        if st.get("guest_pause_ms") is not None:
            lines.append(f"  guest paused {st['guest_pause_ms']} ms (QEMU's STOP to RESUME)")
        if st.get("disk_total"):
            lines.append(f"  disks: copied {st.get('disk_processed', 0) / 1048576:.1f} MiB "
                         f"in {st.get('disk_copy_ms', 0)} ms")
    return "\n".join(lines)


def dry_run(r: dict[str, Any]) -> str:
    """`migrate --dry-run`: what would be copied, to where, and how much."""
    lines = [f"Dry run: {r['domain']} {r['source']} -> {r['dest']}: every check passed"]
    for d in r["disks"]:
        lines.append(f"  {d['target']:<5} {d['format']:<6} {d['source_path']} -> {d['path']} "
                     f"({d['image']}, {(d['copy_bytes'] or 0) / 1048576:.1f} MiB to copy, "
                     f"{d['capacity'] / 1048576:.0f} MiB virtual)")
    if r["disks"]:
        lines.append(f"  {r['copy_bytes'] / 1048576:.1f} MiB in all, NBD on {r['nbd']}")
    else:
        lines.append("  no disk to copy")
    if r.get("nvram"):
        lines.append(f"  nvram {r['nvram']['path']}: made from its template, filled with "
                     "the guest's variables")
    return "\n".join(lines)


def locks(info: dict[str, Any]) -> str:
    lines = [f"{'Lock manager:':<16}{info['driver']}"]
    for res, holder in sorted(info["leases"].items()):
        who = f"{holder['domain']} on {holder['host']} (gen {holder.get('gen')})" if holder \
            else "free"
        lines.append(f"  {res:<60} {who}")
    return "\n".join(lines)
