"""Image fleecing: the snapshot a backup round reads, so the guest never waits on the dest.

A ``blockdev-backup`` puts its copy-before-write (CBW) filter on its source node: run
on the disk's node, a guest write to a cluster not yet sent first waits for that
cluster to reach the dest over the network, and QEMU 7.2's backup (its filter's
default ``on-cbw-error: break-guest-write``) fails the write once the nbd node fails.
So each round reads a local snapshot instead (QEMU's image fleecing, 7.1+):

    guest -> fleece-<t>-cbw (copy-before-write, on-cbw-error break-snapshot)
                 | file                  | target
             disk's node            fleece-<t>-tmp (a sparse local file)
    fleece-<t> (snapshot-access over the filter) -> backup job -> nbd node

A guest write then waits only for the old cluster to reach the local file; a failing
dest (or a full local disk: break-snapshot) fails only the backup job.

The disk's dirty bitmap D (``ferry-<attempt>``, on the disk's node) stays enabled
throughout.  Before a round, one ``transaction`` freezes it into F (``ferry.round``,
disabled, on the disk's node) and clears D, and only then is the filter put in the
guest's path: what the snapshot holds is the disk at or after that instant, and D
holds every write made since.  The job's bitmap must be on its source node, so R
(``round``, on the snapshot-access node) gets F's bits; the job runs in
``bitmap-mode: always``, so when it ends R holds what it did not copy (nothing after
a success), and that goes back into D before the snapshot goes.  Should R be lost, F
(all of the round) goes back instead; should both be lost, D goes: a retry then copies
everything.  Verified by QMP on QEMU 7.2 (docs/migration.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from workers.errors import FerryError, MigrationError, QemuError
from workers.monitor import Monitor

log = logging.getLogger(__name__)

FROZEN = "ferry.round"  # F: not prefixed "ferry-", so it is never taken for a D
ROUND = "round"  # R, on the snapshot-access node
NODE_PREFIX = "fleece-"
CBW_TIMEOUT_S = 30  # a local write slower than this breaks the snapshot, not the guest
DEL_WAIT_S = 5.0


def node_names(target: str) -> tuple[str, str, str]:
    """(snapshot-access, copy-before-write filter, local target) node names of a disk."""
    return f"{NODE_PREFIX}{target}", f"{NODE_PREFIX}{target}-cbw", f"{NODE_PREFIX}{target}-tmp"


def fleece_dir(state_dir: Path) -> Path:
    """Apart from <state dir>/storage (0700): a confined QEMU opens its files here."""
    return state_dir / "fleece"


def fleece_path(state_dir: Path, uuid: str, target: str) -> Path:
    return fleece_dir(state_dir) / f"{uuid}-{target}.img"


class Fleece:
    """The fleecing graph of one disk for one backup round: set up, then taken down."""

    def __init__(self, mon: Monitor, *, fmt: str, qdev: str, bitmap: str, size: int,
                 path: Path, target: str, owner: tuple[int, int] | None = None) -> None:
        self.mon, self.fmt, self.qdev, self.bitmap = mon, fmt, qdev, bitmap
        self.owner = owner  # a confined QEMU's (uid, gid): it opens the file itself
        self.size, self.path = size, path
        self.acc, self.cbw, self.tmp = node_names(target)
        self.added: list[str] = []  # nodes blockdev-added (deleted in reverse)
        self.frozen = False
        self.in_path = False  # the guest's device writes through the filter

    async def start(self) -> str:
        """Freeze D into F, put the filter in the guest's path, and R on the snapshot;
        the node the round's backup reads (its bitmap: R)."""
        await self.mon.execute("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": self.fmt, "name": FROZEN, "disabled": True,
                      "persistent": False}},
            {"type": "block-dirty-bitmap-merge",
             "data": {"node": self.fmt, "target": FROZEN, "bitmaps": [self.bitmap]}},
            {"type": "block-dirty-bitmap-clear",
             "data": {"node": self.fmt, "name": self.bitmap}}]})
        self.frozen = True
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.path, "wb") as f:  # sparse: it grows by what the guest overwrites
            f.truncate(self.size)
            if self.owner is not None:
                os.fchown(f.fileno(), *self.owner)
        await self._add({"driver": "file", "node-name": self.tmp,
                         "filename": str(self.path), "discard": "unmap"})
        await self._add({"driver": "copy-before-write", "node-name": self.cbw,
                         "file": self.fmt, "target": self.tmp,
                         "on-cbw-error": "break-snapshot", "cbw-timeout": CBW_TIMEOUT_S})
        # the filter must be the device's root before anything reads through it: it
        # takes the disk's write permission from then on
        await self.mon.execute("qom-set", {"path": self.qdev, "property": "drive",
                                           "value": self.cbw})
        self.in_path = True
        await self._add({"driver": "snapshot-access", "node-name": self.acc,
                         "file": self.cbw})
        granularity = await self._granularity()
        await self.mon.execute("block-dirty-bitmap-add", {
            "node": self.acc, "name": ROUND, "persistent": False,
            "granularity": granularity})
        await self.mon.execute("block-dirty-bitmap-merge", {
            "node": self.acc, "target": ROUND,
            "bitmaps": [{"node": self.fmt, "name": FROZEN}]})
        return self.acc

    async def _add(self, node: dict[str, Any]) -> None:
        await self.mon.execute("blockdev-add", node)
        self.added.append(str(node["node-name"]))

    async def _granularity(self) -> int:
        blocks = await self.mon.execute("query-named-block-nodes", {"flat": True})
        for n in blocks:
            if n.get("node-name") == self.fmt:
                for b in n.get("dirty-bitmaps") or ():
                    if b.get("name") == self.bitmap:
                        return int(b["granularity"])
        raise MigrationError(f"the dirty bitmap {self.bitmap} of node {self.fmt} went away")

    async def stop(self) -> None:
        """After the round's job ended (or never started): what it did not copy back
        into D, the device back on the disk's node, the graph and its file gone.  Best
        effort, each step on its own; raise at the end if D could not be kept right."""
        kept = await self._give_back()
        if self.acc in self.added:
            with contextlib.suppress(FerryError):
                await _del_when_free(self.mon, self.acc)
            self.added.remove(self.acc)
        if self.in_path:
            await self.mon.execute("qom-set", {"path": self.qdev, "property": "drive",
                                               "value": self.fmt})
            self.in_path = False
        for node in reversed(self.added):
            try:
                await _del_when_free(self.mon, node)
            except FerryError as exc:
                log.warning("fleecing node %s not removed: %s", node, exc)
        self.added = []
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if not kept:
            raise MigrationError(f"the dirty bitmap {self.bitmap} of node {self.fmt} "
                                 "could not be kept whole: a retry copies everything")

    async def _give_back(self) -> bool:
        """R (else F) merged into D, F removed; False if neither could be (D is then
        removed: a bitmap that may lack clusters must never steer a retry)."""
        if not self.frozen:
            return True
        sources: list[Any] = [{"node": self.acc, "name": ROUND}] \
            if self.acc in self.added else []
        sources.append(FROZEN)
        kept = False
        for source in sources:
            try:
                await self.mon.execute("block-dirty-bitmap-merge", {
                    "node": self.fmt, "target": self.bitmap, "bitmaps": [source]})
                kept = True
                break
            except QemuError as exc:
                log.warning("bitmap %s not merged back from %s: %s", self.bitmap, source, exc)
        with contextlib.suppress(FerryError):
            await self.mon.execute("block-dirty-bitmap-remove",
                                   {"node": self.fmt, "name": FROZEN})
        self.frozen = False
        if not kept:
            with contextlib.suppress(FerryError):
                await self.mon.execute("block-dirty-bitmap-remove",
                                       {"node": self.fmt, "name": self.bitmap})
        return kept


async def _del_when_free(mon: Monitor, node: str) -> None:
    """blockdev-del, retried while the job that used the node lets go of it."""
    deadline = time.monotonic() + DEL_WAIT_S
    while True:
        try:
            await mon.execute("blockdev-del", {"node-name": node}, timeout=10)
            return
        except QemuError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def leftover_roots(query_block: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(qdev, target) of the devices whose root is still a fleecing filter."""
    out = []
    for entry in query_block:
        inserted = entry.get("inserted")
        if not isinstance(inserted, Mapping):
            continue
        root = str(inserted.get("node-name") or "")
        if root.startswith(NODE_PREFIX) and root.endswith("-cbw"):
            out.append((str(entry.get("qdev") or ""), root[len(NODE_PREFIX):-len("-cbw")]))
    return out


def filtered_child(graph: Mapping[str, Any], node: str) -> str | None:
    """The node under a filter, from x-debug-query-block-graph (its `file` edge)."""
    ids = {n.get("id"): str(n.get("name") or "") for n in graph.get("nodes") or ()}
    parent = next((i for i, name in ids.items() if name == node), None)
    for edge in graph.get("edges") or ():
        if edge.get("parent") == parent and edge.get("name") == "file":
            return ids.get(edge.get("child")) or None
    return None


async def remove_leftovers(mon: Monitor, state_dir: Path, uuid: str) -> None:
    """After a worker restart mid-round: the guest's devices back on their disks' nodes,
    the fleecing graphs gone, and every ferry bitmap of a disk a round was on removed
    (which clusters the round sent is unknown: the next copy is a full one)."""
    roots = leftover_roots(await mon.execute("query-block"))
    graph = await mon.execute("x-debug-query-block-graph") if roots else {}
    for qdev, target in roots:  # x-debug-query-block-graph: the one way to a child's name
        acc, cbw, tmp = node_names(target)
        fmt = filtered_child(graph, cbw)
        with contextlib.suppress(FerryError):
            await _del_when_free(mon, acc)
        if fmt is None:
            log.warning("fleecing filter %s: the disk's node not found, left in place", cbw)
            continue
        await mon.execute("qom-set", {"path": qdev, "property": "drive", "value": fmt})
        for node in (cbw, tmp):
            with contextlib.suppress(FerryError):
                await _del_when_free(mon, node)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fleece_path(state_dir, uuid, target))
        log.warning("fleecing graph of disk %s removed after an interrupted round", target)
    for node, names in (await _bitmaps(mon)).items():
        if FROZEN not in names:
            continue
        for name in names:
            if name == FROZEN or name.startswith("ferry-"):
                with contextlib.suppress(FerryError):
                    await mon.execute("block-dirty-bitmap-remove", {"node": node, "name": name})


async def _bitmaps(mon: Monitor) -> dict[str, list[str]]:
    """Every named node's named bitmaps."""
    return {str(n.get("node-name")): [str(b["name"]) for b in n.get("dirty-bitmaps") or ()
                                      if b.get("name")]
            for n in await mon.execute("query-named-block-nodes", {"flat": True})}
