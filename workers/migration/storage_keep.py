"""The dest's partial images of interrupted storage copies, kept for a retry.

A failed incoming storage copy normally removes the images its Prepare created.  When
the copy stopped cleanly (the incoming QEMU alive, its NBD server stopped and its
caches flushed by a `stop` before it was killed: a QEMU that died on its own may have
lost qcow2 metadata, so its image is never kept), each such image is kept instead for
FERRY_STORAGE_RETRY_KEEP_S, with the attempt whose data it holds, the guest, the source
host, its size and mtime.  A retry's Prepare continues it when everything matches
(storage_resume.Kept.problem) and removes it on any mismatch; the sweeper removes it
after its time.  One JSON file per image under `<state dir>/storage/kept/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from workers.agent import HostAgent
from workers.domain import DomainDef
from workers.errors import FerryError
from workers.migration.cookie import CookieNbd
from workers.migration.storage_plan import dest_disks
from workers.migration.storage_resume import Kept
from workers.monitor import Monitor
from workers.store import atomic_write

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 10


class KeptImages:
    """The records, one small file per image path."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "storage" / "kept"

    def _path(self, image: str) -> Path:
        return self.dir / f"{hashlib.sha256(image.encode()).hexdigest()[:32]}.json"

    def put(self, rec: Kept) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self._path(rec.path), json.dumps(asdict(rec)).encode())

    def get(self, image: str) -> Kept | None:
        try:
            rec = Kept(**json.loads(self._path(image).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return rec if rec.path == image else None

    def entries(self) -> list[Kept]:
        out = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            with contextlib.suppress(OSError, ValueError, TypeError):
                out.append(Kept(**json.loads(path.read_text())))
        return out

    def drop(self, image: str, *, remove: bool) -> None:
        """Forget the record; with `remove`, the image goes too."""
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(image)
                log.info("removed partial image %s kept for a retry", image)
        with contextlib.suppress(FileNotFoundError):
            self._path(image).unlink()


def claim(agent: HostAgent, d: DomainDef, nbd: CookieNbd | None, source: str
          ) -> dict[str, str]:
    """Prepare of a storage copy: the kept images this retry continues (target ->
    attempt); any other kept image at one of its paths is removed first."""
    kept = KeptImages(agent.store.root)
    if nbd is None:
        return {}
    out = {}
    for dd in dest_disks(d, nbd):
        rec = kept.get(dd.path)
        if rec is None:
            continue
        try:
            st = os.stat(dd.path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        why = rec.problem(attempt=dd.wanted.resume, uuid=d.uuid, source=source,
                          capacity=dd.wanted.capacity, size=size, mtime_ns=mtime,
                          now=time.time())
        kept.drop(dd.path, remove=why is not None)
        if why is None:
            out[dd.disk.target] = rec.attempt
            log.info("disk %s: continuing the partial image %s of copy %s", dd.disk.target,
                     dd.path, rec.attempt)
        else:
            log.info("disk %s: the partial image %s is not continued (%s): a full copy",
                     dd.disk.target, dd.path, why)
    return out


async def written(mon: Monitor, drive_ids: list[str]) -> bool:
    """Whether the copy wrote to any of these disks (the highest offset written since
    the incoming QEMU opened them): an image nothing reached holds nothing to continue,
    and goes like any other (an abort before the copy started, as libvirt)."""
    try:
        stats = await mon.execute("query-blockstats", timeout=FLUSH_TIMEOUT_S)
    except FerryError:
        return False
    return any(int((s.get("stats") or {}).get("wr_highest_offset") or 0) > 0
               for s in stats if s.get("device") in drive_ids)


async def flushed(mon: Monitor) -> bool:
    """Before the incoming QEMU is killed: no more writes (the NBD server stopped) and
    every cached write on disk (`stop` flushes the block layer).  Whether both held."""
    try:
        await mon.execute("nbd-server-stop", timeout=FLUSH_TIMEOUT_S)
        await mon.execute("stop", timeout=FLUSH_TIMEOUT_S)
    except FerryError as exc:
        log.info("partial images not kept: the incoming QEMU did not flush (%s)", exc)
        return False
    return True


def keep(agent: HostAgent, images: dict[str, tuple[str, int]], uuid: str, source: str
         ) -> list[str]:
    """Record `images` (path -> (attempt, capacity)), their QEMU gone; the kept paths."""
    kept = KeptImages(agent.store.root)
    until = time.time() + agent.settings.storage_retry_keep_s
    done = []
    for path, (attempt, capacity) in images.items():
        try:
            st = os.stat(path)
        except OSError:
            continue
        kept.put(Kept(attempt, uuid, source, path, capacity, st.st_size, st.st_mtime_ns,
                      until))
        done.append(path)
        log.info("kept partial image %s of copy %s for %ds", path, attempt,
                 agent.settings.storage_retry_keep_s)
    return done


def sweep(agent: HostAgent) -> list[str]:
    """Kept images whose time is over go; what was done, one line each."""
    kept = KeptImages(agent.store.root)
    now = time.time()
    done = []
    for rec in kept.entries():
        if now > rec.until:
            try:
                st = os.stat(rec.path)
                ours = (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns)
            except OSError:
                ours = False
            kept.drop(rec.path, remove=ours)  # changed since: someone else's now
            done.append(f"removed partial image {rec.path} of copy {rec.attempt}: its keep "
                        "time is over")
    return done
