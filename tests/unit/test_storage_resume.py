"""The retry policy of the storage copy: which bitmap a disk holds, when a retry
continues, when the rounds hand over to the mirror, when a kept image is refused."""

from __future__ import annotations

from workers.migration.cookie import CookieNbd, CookieNbdDisk, parse
from workers.migration.storage_plan import MirrorState, figures
from workers.migration.storage_resume import (
    HANDOVER_BYTES,
    MAX_ROUNDS,
    Kept,
    bitmap_name,
    held_attempt,
    node_bitmaps,
    resumable,
    should_hand_over,
)

BLOCKS = [{"device": "drive-virtio-disk0", "inserted": {
    "node-name": "#block123",
    "dirty-bitmaps": [{"name": "ferry-j1", "count": 4096, "granularity": 65536},
                      {"count": 0, "granularity": 65536}]}},
    {"device": "drive-virtio-disk1", "inserted": {"node-name": "#block9"}}]


def test_a_disks_format_node_and_its_ferry_bitmaps_come_from_query_block() -> None:
    assert node_bitmaps(BLOCKS, "drive-virtio-disk0") == ("#block123", {"ferry-j1": 4096})
    assert node_bitmaps(BLOCKS, "drive-virtio-disk1") == ("#block9", {})
    assert node_bitmaps(BLOCKS, "drive-nope") == ("", {})


def test_the_source_offers_an_attempt_only_when_it_holds_exactly_one_bitmap() -> None:
    assert held_attempt({"ferry-j1": 1}) == "j1"
    assert held_attempt({}) is None
    assert held_attempt({"ferry-j1": 1, "ferry-j2": 2}) is None


def test_a_disk_resumes_only_when_both_ends_name_the_attempt_whose_bitmap_is_there() -> None:
    maps = {bitmap_name("j1"): 10}
    assert resumable("j1", "j1", maps)
    assert not resumable("j1", None, maps)  # the dest kept nothing
    assert not resumable("j1", "j0", maps)  # the dest kept another attempt's image
    assert not resumable("j1", "j1", {})  # the bitmap went (QEMU restarted)
    assert not resumable(None, None, maps)


def test_rounds_hand_over_when_small_when_no_longer_shrinking_or_when_spent() -> None:
    big = 64 << 20
    assert not should_hand_over([], 0)
    assert not should_hand_over([big], 0)
    assert should_hand_over([HANDOVER_BYTES], 0)
    assert not should_hand_over([big, big // 2], 1)
    assert should_hand_over([big, big - (1 << 20)], 1)  # the guest writes as fast
    assert should_hand_over([big, big // 2], MAX_ROUNDS)


def kept(**changes: object) -> Kept:
    base = dict(attempt="j1", uuid="u", source="alpha", path="/d.qcow2", capacity=64,
                size=1000, mtime_ns=5, until=100.0)
    return Kept(**{**base, **changes})  # type: ignore[arg-type]


def problem(rec: Kept, **changes: object) -> str | None:
    now = dict(attempt="j1", uuid="u", source="alpha", capacity=64, size=1000,
               mtime_ns=5, now=50.0)
    return rec.problem(**{**now, **changes})  # type: ignore[arg-type]


def test_a_kept_image_is_continued_only_when_everything_matches() -> None:
    rec = kept()
    assert problem(rec) is None
    assert problem(rec, attempt=None) == "the source holds no bitmap for it"
    assert problem(rec, attempt="j2") == "it is of attempt j1, not j2"
    assert problem(rec, uuid="v") == "it is another guest's"
    assert problem(rec, source="gamma") == "it came from host alpha"
    assert problem(rec, capacity=128) == "the disk's size changed"
    assert problem(rec, mtime_ns=6) == "the file changed since"
    assert problem(rec, now=101.0) == "its keep time is over"


def test_the_figures_add_up_every_job_of_a_disk() -> None:
    m = MirrorState("vda", "drive-virtio-disk0", "migration-vda-storage", 64, 64,
                    ended=True)
    m.next_job()
    m.length, m.offset = 8, 2
    assert figures([m]) == {"disk_total": 72, "disk_processed": 66, "disk_remaining": 6}
    assert not m.ended


def test_the_resume_attribute_round_trips_in_the_nbd_section() -> None:
    xml = ("<qemu-migration><name>g</name><uuid>8b3f4dc4-6a8e-5f9b-94a5-4c35babd8d95</uuid>"
           "<hostname>b</hostname><hostuuid>8b3f4dc4-6a8e-5f9b-94a5-4c35babd8d96</hostuuid>"
           "<nbd port='5000'><disk target='vda' capacity='64' resume='j1'/>"
           "<disk target='vdb' capacity='64'/></nbd></qemu-migration>")
    nbd = parse(xml).nbd
    assert nbd == CookieNbd(5000, (CookieNbdDisk("vda", 64, resume="j1"),
                                   CookieNbdDisk("vdb", 64)))
    assert "resume='j1'" in parse(xml).to_xml().replace('"', "'")
