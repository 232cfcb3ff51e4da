"""The stream's own figures beside QEMU's: channels, compression, bytes on the wire, and the
pause the guest saw.  Pure, so domjobinfo's derived fields have unit tests.

QEMU 7.2 counts multifd pages before they are compressed (`ram.multifd-bytes`,
`transferred`), so the only compressed-byte figure is what a tunnel carried
(`stream_bytes`); xbzrle has its own counters (`compression_*`, libvirt's names).
The guest's pause is QEMU's STOP event on the source to its RESUME event on the
dest, both as QEMU stamps them (one clock when both ends share a machine; across
machines, as good as their clocks agree).
"""

from __future__ import annotations

from typing import Any

from workers.migration.params import MigrationParams

#: the key Perform leaves in the statistics for Finish: QEMU's STOP on the source, epoch µs
STOP_KEY = "stop_event_us"


def figures(p: MigrationParams, stats: dict[str, Any],
            stream_bytes: int | None) -> dict[str, Any]:
    """What ferry adds to QEMU's statistics of an outgoing migration."""
    out: dict[str, Any] = {"parallel_connections": p.channels or None,
                           "compression_methods": list(p.compression) or None,
                           "stream_bytes": stream_bytes}
    pages, overflow = stats.get("compression_pages"), stats.get("compression_overflow")
    if pages is not None and overflow is not None:
        out["compression_cache_hits"] = pages + overflow  # found in the cache: sent encoded
        # or, when the encoding came out bigger than the page, sent whole (overflow)
    return out


def stop_mark(stop_ts: float | None, since: float) -> dict[str, int]:
    """The source's STOP time for Finish, if the guest stopped after `since` (epoch s)."""
    if stop_ts is None or stop_ts < since:
        return {}
    return {STOP_KEY: int(stop_ts * 1_000_000)}


def guest_pause_ms(stats: dict[str, Any], resume_ts: float | None,
                   since: float) -> float | None:
    """STOP on the source to RESUME on the dest, ms; None when either is unknown."""
    stop_us = stats.get(STOP_KEY)
    if type(stop_us) is not int or resume_ts is None or resume_ts < since:
        return None
    pause = resume_ts * 1000 - stop_us / 1000
    return round(pause, 1) if pause >= 0 else None
