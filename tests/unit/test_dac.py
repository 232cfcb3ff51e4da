"""Disk images handed to the QEMU user and given back (libvirt's DAC remember-owner),
on real files: needs root (chown, trusted.* xattrs)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from scripts.testbed.stack import searchable
from workers import dac
from workers.confine import Confinement
from workers.domain import DomainDef
from workers.domain_xml import parse_domain_xml
from workers.errors import InvalidInputError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown and trusted xattrs need root")

QEMU = Confinement("qemu-test", 4321, 4322, ())


@pytest.fixture
def image(tmp_path: Path) -> Path:
    tmp_path.chmod(0o711)
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * 4096)
    os.chown(path, 1000, 1001)
    return path


def owner(path: Path) -> tuple[int, int]:
    return path.stat().st_uid, path.stat().st_gid


def xattrs(path: Path) -> dict[str, str]:
    return {n: os.getxattr(path, n).decode() for n in os.listxattr(path)
            if n.startswith("trusted.ferry.")}


def test_the_first_claim_remembers_the_owner_on_the_file(image: Path) -> None:
    c = dac.claim(QEMU, str(image))
    assert owner(image) == (4321, 4322)
    assert xattrs(image) == {dac.OWNER: "+1000:+1001", dac.REFS: "1", dac.STAMP: dac.boot_time()}
    assert (c.uid, c.gid, c.counted) == (1000, 1001, True)


def test_the_last_of_two_users_gives_the_image_back(image: Path) -> None:
    first, second = dac.claim(QEMU, str(image)), dac.claim(QEMU, str(image))
    assert xattrs(image)[dac.REFS] == "2" and (second.uid, second.gid) == (1000, 1001)
    dac.release(first, restore=True)
    assert owner(image) == (4321, 4322) and xattrs(image)[dac.REFS] == "1"
    dac.release(second, restore=True)
    assert owner(image) == (1000, 1001) and xattrs(image) == {}


def test_a_guest_that_migrated_away_does_not_give_the_image_back(image: Path) -> None:
    c = dac.claim(QEMU, str(image))
    dac.release(c, restore=False)
    assert owner(image) == (4321, 4322) and xattrs(image) == {}


def test_attributes_from_before_a_reboot_are_stale_and_dropped(image: Path) -> None:
    os.setxattr(image, dac.OWNER, b"+7:+7")
    os.setxattr(image, dac.REFS, b"3")
    os.setxattr(image, dac.STAMP, b"1")  # booted long ago
    c = dac.claim(QEMU, str(image))
    assert (c.uid, c.gid) == (1000, 1001)
    assert xattrs(image)[dac.REFS] == "1"


def test_without_xattrs_the_claim_itself_remembers_the_owner(
        image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(*args: object) -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(dac.os, "setxattr", unsupported)
    c = dac.claim(QEMU, str(image))
    assert c.counted is False and owner(image) == (4321, 4322)
    dac.release(c, restore=True, in_use_here=True)
    assert owner(image) == (4321, 4322)
    dac.release(c, restore=True)
    assert owner(image) == (1000, 1001)
    assert dac.Claim.from_json(c.to_json()) == c


def test_a_disk_behind_a_private_directory_is_refused_naming_it(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "disk.img").write_bytes(b"")
    tmp_path.chmod(0o711)
    with pytest.raises(InvalidInputError, match=rf"the QEMU user qemu-test cannot reach disk "
                                                rf"vda {private}/disk.img: directory {private} "
                                                r"is not searchable by it"):
        dac.check_reachable(QEMU, str(private / "disk.img"), "disk vda")
    private.chmod(0o711)
    dac.check_reachable(QEMU, str(private / "disk.img"), "disk vda")


def test_a_directory_is_not_a_disk(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="is not a file or a block device"):
        dac.claim(QEMU, str(tmp_path))


def guest_with(tmp_path: Path, os_extra: str, disk: str = "") -> DomainDef:
    return parse_domain_xml(
        f"<domain type='qemu'><name>g</name><memory>65536</memory><os><type>hvm</type>"
        f"{os_extra}</os><devices>{disk}</devices></domain>")


def test_every_file_qemu_opens_by_path_is_named_with_whether_it_writes_it(
        tmp_path: Path) -> None:
    d = guest_with(tmp_path, "<loader readonly='yes' type='pflash'>/fw/CODE.fd</loader>"
                   "<nvram>/nv/g_VARS.fd</nvram><kernel>/k/vmlinuz</kernel>"
                   "<initrd>/k/initrd</initrd>",
                   "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
                   "<source dev='/dev/loop7'/><target dev='vda' bus='virtio'/></disk>"
                   "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
                   "<source file='/i/cd.iso'/><target dev='hdc' bus='ide'/><readonly/></disk>")
    assert dac.guest_paths(d) == [
        ("/dev/loop7", "disk vda", True), ("/i/cd.iso", "disk hdc", False),
        ("/fw/CODE.fd", "os loader", False), ("/nv/g_VARS.fd", "os nvram", True),
        ("/k/vmlinuz", "os kernel", False), ("/k/initrd", "os initrd", False)]


def test_the_nvram_is_claimed_and_a_readable_kernel_left_alone_an_unreadable_one_not(
        tmp_path: Path) -> None:
    searchable(tmp_path)
    nvram, kernel, initrd = (tmp_path / n for n in ("g_VARS.fd", "vmlinuz", "initrd"))
    for f in (nvram, kernel, initrd):
        f.write_bytes(b"x")
    nvram.chmod(0o600)
    kernel.chmod(0o644)
    initrd.chmod(0o600)
    d = guest_with(tmp_path, f"<loader readonly='yes' type='pflash'>{kernel}</loader>"
                   f"<nvram>{nvram}</nvram><kernel>{kernel}</kernel><initrd>{initrd}</initrd>")
    claims = dac.claim_guest(QEMU, d)
    assert [c.path for c in claims] == [str(nvram), str(initrd)]
    assert owner(nvram) == owner(initrd) == (4321, 4322) and owner(kernel) == (0, 0)
    dac.release_all(claims, restore=True)
    assert owner(nvram) == owner(initrd) == (0, 0) and xattrs(nvram) == {}


def test_a_guest_whose_second_file_cannot_be_reached_leaves_the_first_unchanged(
        tmp_path: Path) -> None:
    searchable(tmp_path)
    nvram = tmp_path / "g_VARS.fd"
    nvram.write_bytes(b"x")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    d = guest_with(tmp_path, f"<loader readonly='yes' type='pflash'>{tmp_path}/c.fd</loader>"
                   f"<nvram>{nvram}</nvram><kernel>{private}/vmlinuz</kernel>")
    (tmp_path / "c.fd").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="cannot reach os kernel"):
        dac.claim_guest(QEMU, d)
    assert owner(nvram) == (0, 0) and xattrs(nvram) == {}
    assert dac.claim_guest(None, d) == []  # QEMU as root: nothing handed over
