"""What a migration's stream asks of each QEMU: capabilities and parameters.

Pure functions of the parameters and the transport, so each rule has a unit
test and another transport (TLS) can merge its own beside them.  Every
capability ferry uses is set on every migration, on or off, and so are the
parameters a capability reads: QEMU keeps them between migrations of one
process (a source that stays after a failed parallel migration must not
open four channels to the next dest, which expects one).

As libvirt: multifd, its channel count and compression, xbzrle and its
cache, and return-path on both ends (both must agree, or the stream breaks:
docs/migration.md); pause-before-switchover and auto-converge on the
source; late-block-activate on the dest.
"""

from __future__ import annotations

from typing import Any

from workers.migration.params import MigrationFlags, MigrationParams

DEFAULT_XBZRLE_CACHE = 64 << 20  # QEMU's default, set again for a process reused
DEFAULT_LEVEL = 1  # QEMU's default multifd-zstd-level and multifd-zlib-level


def capabilities(p: MigrationParams, *, outgoing: bool, two_way: bool,
                 pause_before_switchover: bool = True) -> dict[str, bool]:
    """`migrate-set-capabilities` for one end.

    two_way: the transport carries the dest's replies back to the source
    (return-path: the source counts the migration done only once the dest
    has loaded the state, and resumes by itself when it could not).
    """
    caps = {
        "events": True,
        "postcopy-ram": p.has(MigrationFlags.POSTCOPY),
        "multifd": p.channels > 0,
        "xbzrle": "xbzrle" in p.compression,
        "return-path": two_way,
    }
    if outgoing:
        caps["auto-converge"] = p.has(MigrationFlags.AUTO_CONVERGE)
        caps["pause-before-switchover"] = pause_before_switchover
    else:
        # The dest takes the disk locks only when its CPUs start, so a source whose
        # migration fails late can still resume on its disks.
        caps["late-block-activate"] = True
    return caps


def file_capabilities() -> dict[str, bool]:
    """A save to a file: one plain stream, whatever an earlier migration of this QEMU
    left on (multifd cannot write to an fd, nothing answers a return path)."""
    return {"events": True, "postcopy-ram": False, "auto-converge": False,
            "multifd": False, "xbzrle": False, "return-path": False,
            "pause-before-switchover": False}


def parameters(p: MigrationParams) -> dict[str, Any]:
    """`migrate-set-parameters` of the stream's shape, the same on both ends."""
    multifd = [m for m in p.compression if m in ("zstd", "zlib")]
    out: dict[str, Any] = {"multifd-compression": multifd[0] if multifd else "none"}
    if p.channels:
        out["multifd-channels"] = p.channels
    out["multifd-zstd-level"] = DEFAULT_LEVEL if p.comp_zstd_level is None else p.comp_zstd_level
    out["multifd-zlib-level"] = DEFAULT_LEVEL if p.comp_zlib_level is None else p.comp_zlib_level
    if "xbzrle" in p.compression:
        out["xbzrle-cache-size"] = p.comp_xbzrle_cache or DEFAULT_XBZRLE_CACHE
    return out


def as_qmp(caps: dict[str, bool]) -> list[dict[str, Any]]:
    return [{"capability": name, "state": state} for name, state in caps.items()]
