"""Storage copy policy on literal XML and QMP replies: which disks, what the dest
creates, the mirrors' figures and failures."""

from __future__ import annotations

import pytest

from workers.domain_xml import parse_domain_xml
from workers.errors import InvalidInputError, MigrationError, UnsupportedError
from workers.migration.cookie import CookieNbd, CookieNbdDisk
from workers.migration.storage_plan import (
    DestDisk,
    MirrorState,
    RateMeter,
    backing_path,
    check_dest_answer,
    create_argv,
    dest_disks,
    disks_to_copy,
    failure,
    figures,
    nbd_disk,
    needs_backing,
    node_name,
    update_from_event,
    update_from_query,
)

XML = """<domain type='kvm'>
  <name>g</name>
  <uuid>dcf47dbd-46d1-4d5b-b442-262a806a333a</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/img/root.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/img/data.raw'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/shared/s.raw'/>
      <target dev='vdc' bus='virtio'/>
      <shareable/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/x.iso'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
  </devices>
</domain>"""
D = parse_domain_xml(XML)


def targets(disks: list) -> list[str]:  # type: ignore[type-arg]
    return [d.target for d in disks]


def test_without_a_list_every_writable_unshared_disk_with_a_source_is_copied() -> None:
    assert targets(disks_to_copy(D, ())) == ["vda", "vdb"]


def test_a_list_copies_only_its_disks_in_definition_order() -> None:
    assert targets(disks_to_copy(D, ("vdb", "vda"))) == ["vda", "vdb"]
    assert targets(disks_to_copy(D, ("vdb",))) == ["vdb"]


@pytest.mark.parametrize("listed, needle", [
    (("vdz",), "disk target vdz not found"),
    (("hdc",), "hdc cannot be copied: it is read-only"),
    (("vdc",), "vdc cannot be copied: it is shareable"),
])
def test_a_listed_disk_that_cannot_be_copied_is_refused_by_name(
        listed: tuple[str, ...], needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        disks_to_copy(D, listed)


# query-block's image of a qcow2 top (64 MiB) over a raw base (as QEMU 7.2 answers)
TOP = {"device": "drive-virtio-disk0", "inserted": {"node-name": "#block123", "image": {
    "filename": "/img/root.qcow2", "format": "qcow2", "virtual-size": 67108864,
    "actual-size": 4_718_592, "cluster-size": 131072, "backing-filename": "base.raw",
    "full-backing-filename": "/img/base.raw", "backing-filename-format": "raw",
    "backing-image": {"filename": "/img/base.raw", "format": "raw",
                      "virtual-size": 67108864, "actual-size": 8_388_608}}}}


def test_a_full_copy_names_capacity_format_cluster_size_and_the_whole_chains_allocation(
        ) -> None:
    assert nbd_disk(D.disks[0], TOP, inc=False) == CookieNbdDisk(
        "vda", 67108864, format="qcow2", cluster_size=131072, allocation=13_107_200)


def test_an_incremental_copy_names_the_backing_file_as_the_top_image_names_it() -> None:
    assert nbd_disk(D.disks[0], TOP, inc=True) == CookieNbdDisk(
        "vda", 67108864, format="qcow2", cluster_size=131072, backing_file="base.raw",
        backing_format="raw", allocation=4_718_592)


def test_an_image_format_ferry_does_not_copy_is_refused() -> None:
    vmdk = {"inserted": {"image": {"format": "vmdk", "virtual-size": 1}}}
    with pytest.raises(UnsupportedError, match="vmdk"):
        nbd_disk(D.disks[0], vmdk, inc=False)


NBD = CookieNbd(0, (CookieNbdDisk("vda", 67108864, format="qcow2", cluster_size=131072,
                                  backing_file="base.raw", backing_format="raw"),
                    CookieNbdDisk("vdb", 1 << 20, format="raw")))


def test_the_dest_matches_the_sources_disks_with_its_definition() -> None:
    dds = dest_disks(D, NBD)
    assert [(dd.disk.target, dd.path, dd.export) for dd in dds] == [
        ("vda", "/img/root.qcow2", "drive-virtio-disk0"),
        ("vdb", "/img/data.raw", "drive-virtio-disk1")]


@pytest.mark.parametrize("disk, needle", [
    (CookieNbdDisk("vdz", 1), "unable to find disk target 'vdz'"),
    (CookieNbdDisk("hdc", 1), "empty or read-only disk hdc"),
    (CookieNbdDisk("vdb", 1, format="qcow2"), "qcow2 on the source but raw"),
])
def test_a_source_disk_the_dest_cannot_take_is_refused(disk: CookieNbdDisk,
                                                       needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        dest_disks(D, CookieNbd(0, (disk,)))


def test_missing_images_are_created_like_the_sources() -> None:
    vda, vdb = dest_disks(D, NBD)
    assert create_argv(vda) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-o",
        "cluster_size=131072,backing_file=base.raw,backing_fmt=raw", "/img/root.qcow2",
        "67108864"]
    assert create_argv(vdb) == ["qemu-img", "create", "-q", "-f", "raw", "/img/data.raw",
                                "1048576"]


def test_a_backing_file_name_with_a_comma_is_escaped_for_qemu_img() -> None:
    dd = DestDisk(D.disks[0], CookieNbdDisk("vda", 1, backing_file="/b,c.raw"))
    assert "backing_file=/b,,c.raw,backing_fmt=raw" in create_argv(dd)


def test_a_relative_backing_file_is_found_beside_the_image() -> None:
    assert backing_path("/img/root.qcow2", "base.raw") == "/img/base.raw"
    assert backing_path("/img/root.qcow2", "/other/base.raw") == "/other/base.raw"
    vda, vdb = dest_disks(D, NBD)
    assert needs_backing(vda) == "/img/base.raw" and needs_backing(vdb) is None


def mirrors() -> list[MirrorState]:
    return [MirrorState("vda", "drive-virtio-disk0", node_name(D.disks[0])),
            MirrorState("vdb", "drive-virtio-disk1", node_name(D.disks[1]))]


def test_figures_are_the_sums_of_the_jobs_len_and_offset() -> None:
    ms = mirrors()
    assert ms[0].node == "migration-vda-storage"
    update_from_query(ms, [
        {"device": "drive-virtio-disk0", "len": 100, "offset": 40, "ready": False},
        {"device": "drive-virtio-disk1", "len": 50, "offset": 50, "ready": True},
        {"device": "someone-else", "len": 9, "offset": 1}])
    assert figures(ms) == {"disk_total": 150, "disk_processed": 90, "disk_remaining": 60}
    assert [m.ready for m in ms] == [False, True]


def test_events_mark_ready_and_ended_and_keep_the_last_figures() -> None:
    ms = mirrors()
    update_from_event(ms, "BLOCK_JOB_READY", {"device": "drive-virtio-disk0", "len": 7,
                                              "offset": 7})
    update_from_event(ms, "BLOCK_JOB_COMPLETED", {"device": "drive-virtio-disk0", "len": 9,
                                                  "offset": 9})
    update_from_query(ms, [])  # an ended job is no longer listed: figures kept
    assert (ms[0].ready, ms[0].ended, ms[0].length) == (True, True, 9)
    assert failure(ms) is None
    assert update_from_event(ms, "BLOCK_JOB_READY", {"device": "nope"}) is None


def test_a_completed_event_with_an_error_is_the_failure_named_by_disk() -> None:
    ms = mirrors()
    update_from_event(ms, "BLOCK_JOB_ERROR", {"device": "drive-virtio-disk1",
                                              "operation": "write", "action": "report"})
    update_from_event(ms, "BLOCK_JOB_COMPLETED", {"device": "drive-virtio-disk1", "len": 5,
                                                  "offset": 2, "error": "No space left on device"})
    assert failure(ms) == "the copy of disk vdb to the dest failed: No space left on device"


def test_a_cancelled_mirror_is_a_failure() -> None:
    ms = mirrors()
    update_from_event(ms, "BLOCK_JOB_CANCELLED", {"device": "drive-virtio-disk0"})
    assert failure(ms) == "the copy of disk vda was cancelled"


def test_the_rate_is_bytes_per_second_over_recent_samples() -> None:
    meter = RateMeter(window_s=2.0)
    assert meter.update(0, 10.0) == 0
    assert meter.update(100, 11.0) == 100
    assert meter.update(300, 12.0) == 150
    assert meter.update(300, 15.0) == 0  # old samples left the window


def test_the_dests_answer_must_name_exactly_the_disks_copied() -> None:
    disks = disks_to_copy(D, ())
    ok = CookieNbd(49153, (CookieNbdDisk("vda", 1), CookieNbdDisk("vdb", 1)))
    assert check_dest_answer(disks, ok) == 49153
    with pytest.raises(InvalidInputError, match="does not copy: vdz"):
        check_dest_answer(disks, CookieNbd(1, (*ok.disks, CookieNbdDisk("vdz", 1))))
    with pytest.raises(MigrationError, match=r"no NBD target for disk\(s\) vdb"):
        check_dest_answer(disks, CookieNbd(1, ok.disks[:1]))
    with pytest.raises(MigrationError, match="no NBD section"):
        check_dest_answer(disks, None)
    with pytest.raises(MigrationError, match="no NBD port"):
        check_dest_answer(disks, CookieNbd(0, ok.disks))
