"""The fleecing graph of a backup round: its QMP sequence in and out, and what goes back
into the disk's bitmap when the round's bitmap is lost (a fake monitor records the
commands; QEMU's side is proven by the storage e2e tests)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from workers.errors import MigrationError, QemuError
from workers.migration.storage_fleece import (
    FROZEN,
    ROUND,
    Fleece,
    filtered_child,
    fleece_path,
    leftover_roots,
    node_names,
)
from workers.migration.storage_keep import written


class FakeMonitor:
    """Answers every command with {} but query-named-block-nodes; fails the ones named."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail or set()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float = 30.0, oob: bool = False) -> Any:
        self.calls.append((cmd, args or {}))
        key = f"{cmd}:{(args or {}).get('bitmaps', [''])[0]}" if "merge" in cmd else cmd
        if key in self.fail or cmd in self.fail:
            raise QemuError(f"{cmd} failed")
        if cmd == "query-named-block-nodes":
            return [{"node-name": "#block1", "dirty-bitmaps": [
                {"name": "ferry-j1", "granularity": 65536, "count": 0}]}]
        return {}

    def names(self) -> list[str]:
        out = []
        for cmd, args in self.calls:
            detail = args.get("node-name") or args.get("value") or args.get("name") or ""
            out.append(f"{cmd} {detail}".strip())
        return out


def fleece(mon: FakeMonitor, tmp_path: Path) -> Fleece:
    return Fleece(mon, fmt="#block1", qdev="/machine/peripheral/vda/virtio-backend",
                  bitmap="ferry-j1", size=1 << 20, path=fleece_path(tmp_path, "u1", "vda"),
                  target="vda")


def test_a_round_freezes_the_bitmap_before_the_filter_enters_the_guests_path(
        tmp_path: Path) -> None:
    mon = FakeMonitor()
    fl = fleece(mon, tmp_path)
    assert asyncio.run(fl.start()) == "fleece-vda"
    assert mon.names() == [
        "transaction", "blockdev-add fleece-vda-tmp", "blockdev-add fleece-vda-cbw",
        "qom-set fleece-vda-cbw", "blockdev-add fleece-vda", "query-named-block-nodes",
        "block-dirty-bitmap-add round", "block-dirty-bitmap-merge"]
    actions = [a["type"] for a in mon.calls[0][1]["actions"]]
    assert actions == ["block-dirty-bitmap-add", "block-dirty-bitmap-merge",
                       "block-dirty-bitmap-clear"]
    assert mon.calls[2][1]["on-cbw-error"] == "break-snapshot"
    assert fl.path.stat().st_size == 1 << 20 and fl.path.stat().st_blocks == 0  # sparse


def test_a_round_gives_what_it_did_not_copy_back_then_leaves_nothing(tmp_path: Path) -> None:
    mon = FakeMonitor()
    fl = fleece(mon, tmp_path)
    asyncio.run(fl.start())
    mon.calls.clear()
    asyncio.run(fl.stop())
    assert mon.names() == [
        "block-dirty-bitmap-merge", "block-dirty-bitmap-remove ferry.round",
        "blockdev-del fleece-vda", "qom-set #block1", "blockdev-del fleece-vda-cbw",
        "blockdev-del fleece-vda-tmp"]
    assert mon.calls[0][1] == {"node": "#block1", "target": "ferry-j1",
                               "bitmaps": [{"node": "fleece-vda", "name": ROUND}]}
    assert not fl.path.exists()


def test_a_lost_round_bitmap_gives_the_whole_round_back(tmp_path: Path) -> None:
    mon = FakeMonitor(fail={"block-dirty-bitmap-merge:{'node': 'fleece-vda', 'name': 'round'}"})
    fl = fleece(mon, tmp_path)
    asyncio.run(fl.start())
    mon.calls.clear()
    asyncio.run(fl.stop())
    merges = [a for c, a in mon.calls if c == "block-dirty-bitmap-merge"]
    assert [m["bitmaps"] for m in merges] == [[{"node": "fleece-vda", "name": ROUND}],
                                              [FROZEN]]


def test_a_bitmap_that_cannot_be_made_whole_is_removed_and_said(tmp_path: Path) -> None:
    mon = FakeMonitor()
    fl = fleece(mon, tmp_path)
    asyncio.run(fl.start())
    mon.fail = {"block-dirty-bitmap-merge"}
    mon.calls.clear()
    with pytest.raises(MigrationError, match="retry copies everything"):
        asyncio.run(fl.stop())
    assert ("block-dirty-bitmap-remove", {"node": "#block1", "name": "ferry-j1"}) in mon.calls
    assert ("qom-set", {"path": fl.qdev, "property": "drive", "value": "#block1"}) in mon.calls


def test_a_round_that_failed_before_its_filter_only_gives_the_bitmap_back(
        tmp_path: Path) -> None:
    mon = FakeMonitor(fail={"blockdev-add"})
    fl = fleece(mon, tmp_path)
    with pytest.raises(QemuError):
        asyncio.run(fl.start())
    mon.calls.clear()
    asyncio.run(fl.stop())
    assert mon.names() == ["block-dirty-bitmap-merge", "block-dirty-bitmap-remove ferry.round"]
    assert mon.calls[0][1]["bitmaps"] == [FROZEN]


def test_devices_left_on_a_fleecing_filter_are_found_by_their_root() -> None:
    blocks = [{"device": "drive-vda", "qdev": "/q/vda",
               "inserted": {"node-name": "fleece-vda-cbw"}},
              {"device": "drive-vdb", "qdev": "/q/vdb", "inserted": {"node-name": "#block7"}},
              {"device": "drive-cd", "qdev": "/q/cd"}]
    assert leftover_roots(blocks) == [("/q/vda", "vda")]
    assert node_names("vda") == ("fleece-vda", "fleece-vda-cbw", "fleece-vda-tmp")


def test_the_node_under_a_filter_is_its_file_edge() -> None:
    graph = {"nodes": [{"id": 1, "name": "fleece-vda-cbw"}, {"id": 2, "name": "#block7"},
                       {"id": 3, "name": "fleece-vda-tmp"}],
             "edges": [{"parent": 1, "child": 3, "name": "target"},
                       {"parent": 1, "child": 2, "name": "file"}]}
    assert filtered_child(graph, "fleece-vda-cbw") == "#block7"
    assert filtered_child(graph, "nothing") is None


def test_the_dest_keeps_only_an_image_the_copy_wrote_to() -> None:
    class Stats(FakeMonitor):
        def __init__(self, offsets: dict[str, int]) -> None:
            super().__init__()
            self.offsets = offsets

        async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                          timeout: float = 30.0, oob: bool = False) -> Any:
            assert cmd == "query-blockstats"
            return [{"device": d, "stats": {"wr_highest_offset": o}}
                    for d, o in self.offsets.items()]

    wrote = {"drive-vda": 0, "drive-vdb": 4 << 20}
    assert asyncio.run(written(Stats(wrote), ["drive-vdb"]))
    assert not asyncio.run(written(Stats(wrote), ["drive-vda"]))  # Prepare's image only
    assert not asyncio.run(written(Stats(wrote), []))
