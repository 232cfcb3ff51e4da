"""FERRY_ALLOWED_DIRS on a real worker: paths outside are refused with one line and
nothing changes; paths inside work (define, start, save, restore, dump, migrate in)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scripts.testbed.stack import Stack, searchable
from tasks.client import Client
from tests.conftest import Guest, qemu_pids_of
from workers.errors import FerryError

HOST = "guarded"


@pytest.fixture
def outside() -> Iterator[Path]:
    path = searchable(Path(tempfile.mkdtemp(prefix="ferry-outside-", dir="/tmp")))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def guarded(stack: Stack, tmp_path: Path) -> Iterator[Callable[[bool], str]]:
    """(Re)start host 'guarded', allowed only tmp_path when `restricted`."""

    def start(restricted: bool) -> str:
        if HOST in stack.workers:
            stack.stop_worker(HOST)
        env = {"FERRY_ALLOWED_DIRS": str(tmp_path) if restricted else ""}
        stack.start_worker(HOST, env=env)
        return HOST

    yield start
    if HOST in stack.workers:
        state_dir = stack.workers[HOST].state_dir
        stack.remove_worker(HOST)  # and its guests, by pid
        shutil.rmtree(state_dir, ignore_errors=True)  # the next test's host starts empty


def _refused(call: Callable[[], object], needle: str = "outside the allowed directories") -> str:
    with pytest.raises(FerryError) as err:
        call()
    text = str(err.value)
    assert needle in text and "\n" not in text, text
    return text


def _names(client: Client) -> list[str]:
    return sorted(d["name"] for d in client.call(HOST, "list", all=True))


def test_definitions_naming_paths_outside_the_allowed_dirs_are_refused_and_nothing_defined(
        client: Client, make_guest: Callable[..., Guest], guarded: Callable[[bool], str],
        tmp_path: Path, outside: Path) -> None:
    guarded(False)
    old = make_guest(domain_type="qemu")
    old_xml = old.xml.replace(str(old.disk), str(outside / "old.img"))
    shutil.copyfile(old.disk, outside / "old.img")
    client.call(HOST, "define", xml=old_xml)  # allowed before the policy

    guarded(True)
    assert _names(client) == [old.name], "a stored definition still loads"
    _refused(lambda: client.call(HOST, "start", domain=old.name), f"{outside}/old.img")
    assert qemu_pids_of(old.uuid) == []

    guest = make_guest(domain_type="qemu")
    (tmp_path / "escape.img").symlink_to(outside / "old.img")
    bad = {
        "disk outside": guest.xml.replace(str(guest.disk), str(outside / "x.img")),
        "dotdot": guest.xml.replace(str(guest.disk), f"{tmp_path}/../{outside.name}/x.img"),
        "symlink out": guest.xml.replace(str(guest.disk), str(tmp_path / "escape.img")),
        "serial outside": guest.xml.replace(str(guest.serial), str(outside / "s.log")),
    }
    for what, xml in bad.items():
        _refused(lambda xml=xml: client.call(HOST, "define", xml=xml))
        assert _names(client) == [old.name], what
    assert list(outside.iterdir()) == [outside / "old.img"], "no serial log was created"

    client.call(HOST, "define", xml=guest.xml)
    info = client.call(HOST, "start", domain=guest.name)
    assert info["state"] == "running" and qemu_pids_of(guest.uuid) == [info["pid"]]


def test_save_restore_and_dump_paths_outside_directories_or_symlinks_out_are_refused(
        client: Client, make_guest: Callable[..., Guest], guarded: Callable[[bool], str],
        tmp_path: Path, outside: Path) -> None:
    guarded(True)
    guest = make_guest(domain_type="qemu")
    client.call(HOST, "define", xml=guest.xml)
    pid = client.call(HOST, "start", domain=guest.name)["pid"]
    (tmp_path / "out.img").symlink_to(outside / "out.img")
    for path, needle in [(outside / "a.img", "outside the allowed"),
                         (tmp_path / "out.img", f"resolves to {outside}/out.img"),
                         (tmp_path, "is a directory")]:
        _refused(lambda p=path: client.call(HOST, "save", domain=guest.name, path=str(p)),
                 needle)
        _refused(lambda p=path: client.call(HOST, "dump", domain=guest.name, path=str(p)),
                 needle)
    assert list(outside.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if ".ferry-" in p.name]
    info = client.call(HOST, "dominfo", domain=guest.name)
    assert (info["state"], info["pid"]) == ("running", pid)
    assert client.call(HOST, "domjobinfo", domain=guest.name)["type"] == "none"

    image = tmp_path / "g.img"
    client.call(HOST, "save", domain=guest.name, path=str(image), timeout=120)
    assert client.call(HOST, "dominfo", domain=guest.name)["state"] == "shutoff"
    shutil.copyfile(image, outside / "g.img")
    (tmp_path / "in.img").symlink_to(outside / "g.img")
    for path, needle in [(outside / "g.img", "outside the allowed"),
                         (tmp_path / "in.img", "outside the allowed"),
                         (tmp_path, "is a directory")]:
        _refused(lambda p=path: client.call(HOST, "restore", path=str(p)), needle)
        assert client.call(HOST, "dominfo", domain=guest.name)["state"] == "shutoff"
        assert qemu_pids_of(guest.uuid) == []
    restored = client.call(HOST, "restore", path=str(image), timeout=120)
    assert restored["state"] == "running" and qemu_pids_of(guest.uuid) == [restored["pid"]]


def test_an_incoming_migration_of_a_guest_with_a_disk_outside_is_refused_at_prepare(
        client: Client, make_guest: Callable[..., Guest], guarded: Callable[[bool], str],
        tmp_path: Path, outside: Path) -> None:
    guarded(True)
    guest = make_guest(domain_type="qemu")
    shutil.copyfile(guest.disk, outside / "m.img")
    xml = guest.xml.replace(str(guest.disk), str(outside / "m.img"))
    client.call("alpha", "define", xml=xml)
    pid = client.call("alpha", "start", domain=guest.name)["pid"]

    with pytest.raises(FerryError) as err:
        client.migrate(guest.name, "alpha", HOST, live=True).wait(timeout=60)
    assert "outside the allowed directories" in str(err.value)
    assert f"phase prepare, host {HOST}" in str(err.value)
    info = client.call("alpha", "dominfo", domain=guest.name)
    assert (info["state"], info["pid"]) == ("running", pid)
    assert qemu_pids_of(guest.uuid) == [pid]
    assert _names(client) == []

    ok = make_guest(domain_type="qemu")  # its disk is inside tmp_path
    client.call("alpha", "define", xml=ok.xml)
    client.call("alpha", "start", domain=ok.name)
    with pytest.raises(FerryError, match=r"migration URI socket .* is outside the allowed"):
        client.migrate(ok.name, "alpha", HOST, live=True,
                       migrate_uri=f"unix:{outside}/m.sock").wait(timeout=60)
    assert list(outside.iterdir()) == [outside / "m.img"]
    assert client.migrate(ok.name, "alpha", HOST, live=True).wait(timeout=60)["result"] == \
        "completed"
    assert client.call(HOST, "dominfo", domain=ok.name)["state"] == "running"
