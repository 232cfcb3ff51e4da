"""Host records in Redis: where each host's heartbeat is (workers/heartbeat.py writes it)
and how clients read them.  Apart from the heartbeat's thread and logging, so that the
`ferry` command reads them with its own small client (config/resp.py) cheaply.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

HOSTS_SET = "ferry:hosts"


class Reader(Protocol):
    """What the readers ask of a client: redis-py's, or the `ferry` command's."""

    def get(self, name: str) -> Any: ...

    def smembers(self, name: str) -> Any: ...


def host_key(name: str) -> str:
    return f"ferry:host:{name}"


def tls_fields(tls: Any) -> dict[str, Any]:
    """The hosts list's TLS fields from a heartbeat's `tls` (absent in older workers):
    tls (both ends' material valid), tls_required, tls_expires, tls_problems."""
    tls = tls if isinstance(tls, dict) else {}
    return {"tls": bool(tls.get("server") and tls.get("client")),
            "tls_required": bool(tls.get("required")),
            "tls_expires": tls.get("expires"), "tls_problems": list(tls.get("problems") or [])}


def list_hosts(client: Reader) -> list[dict[str, Any]]:
    """Every host ever seen, alive or not, from the heartbeat records."""
    names = sorted(n.decode() if isinstance(n, bytes) else n for n in client.smembers(HOSTS_SET))
    hosts: list[dict[str, Any]] = []
    for name in names:
        raw = client.get(host_key(name))
        if raw is None:
            hosts.append(
                {"name": name, "uuid": None, "address": None, "alive": False, "guests": [],
                 **tls_fields(None)}
            )
            continue
        rec = json.loads(raw)
        hosts.append(
            {
                "name": name,
                "uuid": rec["uuid"],
                "address": rec["address"],
                "alive": True,
                "guests": rec["guests"],
                "version": rec["version"],
                **tls_fields(rec.get("tls")),
            }
        )
    return hosts


def get_host(client: Reader, name: str) -> dict[str, Any] | None:
    raw = client.get(host_key(name))
    return None if raw is None else dict(json.loads(raw))
