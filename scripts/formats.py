"""Human output of the CLI, virsh-like.  `--json` bypasses all of this."""

from __future__ import annotations

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


def hosts(items: list[dict[str, Any]]) -> str:
    header = f" {'Name':<16} {'Alive':<6} {'Address':<16} {'UUID':<36}  Guests"
    lines = [header, "-" * len(header)]
    for h in items:
        lines.append(f" {h['name']:<16} {'yes' if h['alive'] else 'no':<6} "
                     f"{h['address'] or '-':<16} {h['uuid'] or '-':<36}  "
                     f"{', '.join(h['guests']) or '-'}")
    return "\n".join(lines)


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
