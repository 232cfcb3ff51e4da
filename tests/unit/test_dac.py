"""Disk images handed to the QEMU user and given back (libvirt's DAC remember-owner),
on real files: needs root (chown, trusted.* xattrs)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from workers import dac
from workers.confine import Confinement
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
