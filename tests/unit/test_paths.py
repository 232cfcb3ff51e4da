"""FERRY_ALLOWED_DIRS: which host paths a definition or an image request may name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scripts.testbed.guestxml import guest_xml
from workers.domain_xml import parse_domain_xml
from workers.errors import InvalidInputError
from workers.image_stream import TempImage, open_image, target_path
from workers.paths import AllowedDirs, PathNotAllowedError, domain_paths


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    inside, outside = tmp_path / "vms", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    return inside, outside


def test_no_allowed_dirs_means_no_restriction() -> None:
    assert AllowedDirs().allows("/etc/shadow")
    AllowedDirs().check("/anything", "disk hda")


def test_paths_inside_are_allowed_and_a_prefix_sibling_is_not(dirs: tuple[Path, Path]) -> None:
    inside, _ = dirs
    allowed = AllowedDirs((inside,))
    assert allowed.allows(inside / "a.img") and allowed.allows(inside / "sub" / "b.img")
    assert allowed.allows(inside)
    assert not allowed.allows(f"{inside}2/a.img")  # /x/vms2 is not inside /x/vms


def test_dotdot_is_resolved_before_the_check(dirs: tuple[Path, Path]) -> None:
    inside, outside = dirs
    with pytest.raises(PathNotAllowedError, match="outside the allowed directories") as err:
        AllowedDirs((inside,)).check(f"{inside}/../elsewhere/x.img", "disk hda")
    assert f"resolves to {outside}/x.img" in str(err.value)
    assert "FERRY_ALLOWED_DIRS" in str(err.value) and "\n" not in str(err.value)


def test_a_symlink_inside_that_points_outside_is_refused(dirs: tuple[Path, Path]) -> None:
    inside, outside = dirs
    (outside / "secret").write_text("x")
    (inside / "link.img").symlink_to(outside / "secret")
    (inside / "linkdir").symlink_to(outside)
    allowed = AllowedDirs((inside,))
    assert not allowed.allows(inside / "link.img")
    assert not allowed.allows(inside / "linkdir" / "new.img")


def test_an_allowed_dir_given_through_a_symlink_still_matches(dirs: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    inside, _ = dirs
    (tmp_path / "alias").symlink_to(inside)
    assert AllowedDirs((tmp_path / "alias",)).allows(inside / "a.img")


def test_a_definition_names_its_disks_and_file_serials(dirs: tuple[Path, Path]) -> None:
    inside, outside = dirs
    d = parse_domain_xml(guest_xml("g", inside / "g.img", outside / "g.serial"))
    assert list(domain_paths(d)) == [("disk hda", str(inside / "g.img")),
                                     ("serial 0 file", str(outside / "g.serial"))]
    with pytest.raises(PathNotAllowedError, match="serial 0 file"):
        AllowedDirs((inside,)).check_domain(d)
    AllowedDirs((inside, outside)).check_domain(d)


def test_an_image_target_that_is_a_directory_or_a_device_is_refused(
        dirs: tuple[Path, Path]) -> None:
    inside, _ = dirs
    with pytest.raises(InvalidInputError, match="is a directory"):
        target_path(str(inside), AllowedDirs())
    with pytest.raises(InvalidInputError, match="not a regular file"):
        target_path("/dev/null", AllowedDirs())
    with pytest.raises(InvalidInputError, match="must be absolute"):
        target_path("rel/x.img", AllowedDirs())


def test_an_image_target_through_a_symlink_is_resolved_and_rechecked(
        dirs: tuple[Path, Path]) -> None:
    inside, outside = dirs
    (inside / "out.img").symlink_to(outside / "x.img")
    (inside / "ok.img").symlink_to(inside / "real.img")
    allowed = AllowedDirs((inside,))
    with pytest.raises(PathNotAllowedError, match=f"resolves to {outside}/x.img"):
        target_path(str(inside / "out.img"), allowed)
    assert target_path(str(inside / "ok.img"), allowed) == inside / "real.img"
    (inside / "dir.img").symlink_to(outside)
    with pytest.raises(InvalidInputError, match="is a directory"):
        target_path(str(inside / "dir.img"), allowed)


def test_reading_an_image_refuses_directories_and_paths_outside(dirs: tuple[Path, Path]) -> None:
    inside, outside = dirs
    (outside / "x.img").write_bytes(b"FERRYIMG")
    (inside / "x.img").symlink_to(outside / "x.img")
    allowed = AllowedDirs((inside,))
    with pytest.raises(InvalidInputError, match="is a directory"):
        open_image(str(inside), allowed)
    with pytest.raises(PathNotAllowedError):
        open_image(str(inside / "x.img"), allowed)
    with pytest.raises(PathNotAllowedError):
        open_image(str(outside / "x.img"), allowed)
    os.close(open_image(str(outside / "x.img"), AllowedDirs()))


def test_the_opened_file_itself_is_checked_whatever_path_led_there(
        dirs: tuple[Path, Path]) -> None:
    """What check_fd sees is the file really opened: a swap after the path check is caught."""
    inside, outside = dirs
    fd = os.open(outside / "raced.img", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(PathNotAllowedError, match=f"was opened as {outside}/raced.img"):
            AllowedDirs((inside,)).check_fd(fd, inside / "raced.img", "image path")
    finally:
        os.close(fd)


def test_a_temp_image_is_private_and_created_inside(dirs: tuple[Path, Path]) -> None:
    inside, _ = dirs
    img = TempImage(inside / "a.img", AllowedDirs((inside,)))
    try:
        assert img.tmp.parent == inside and (img.tmp.stat().st_mode & 0o777) == 0o600
    finally:
        img.discard()
    assert list(inside.iterdir()) == []
