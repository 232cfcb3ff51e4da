"""Who a confined QEMU runs as, and the private copies of files it may read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers import confine, hostcaps
from workers.errors import InvalidInputError, UnsupportedError


def test_an_empty_or_root_user_means_qemu_runs_as_the_worker() -> None:
    assert confine.resolve("", "") is None
    assert confine.resolve("root", "") is None


def test_an_unknown_user_or_group_is_a_clear_error() -> None:
    with pytest.raises(InvalidInputError, match="FERRY_QEMU_USER: no user 'no-such-user'"):
        confine.resolve("no-such-user", "")
    with pytest.raises(InvalidInputError, match="FERRY_QEMU_GROUP: no group 'no-such-group'"):
        confine.resolve("nobody", "no-such-group")


def test_a_user_gets_its_own_group_and_the_group_of_dev_kvm() -> None:
    conf = confine.resolve("nobody", "")
    assert conf is not None and conf.uid != 0
    if os.path.exists("/dev/kvm") and os.stat("/dev/kvm").st_gid not in (0, conf.gid):
        assert os.stat("/dev/kvm").st_gid in conf.groups


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_private_copy_belongs_to_the_qemu_user_alone_and_goes_after(tmp_path: Path) -> None:
    conf = confine.Confinement("q", 4321, 4322, ())
    (tmp_path / "ca-cert.pem").write_text("ca")
    (tmp_path / "server-key.pem").write_text("key")
    with confine.private_copy(conf, tmp_path, ("ca-cert.pem", "server-key.pem",
                                               "server-cert.pem")) as copy:
        st = copy.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (4321, 4322, 0o700)
        assert sorted(p.name for p in copy.iterdir()) == ["ca-cert.pem", "server-key.pem"]
        key = (copy / "server-key.pem").stat()
        assert (key.st_uid, key.st_mode & 0o777) == (4321, 0o400)
    assert not copy.exists()
    assert (tmp_path / "server-key.pem").stat().st_uid == 0  # the original is untouched


def test_postcopy_for_a_confined_qemu_names_the_sysctl_it_needs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sysctl = tmp_path / "unprivileged_userfaultfd"
    sysctl.write_text("0\n")
    monkeypatch.setattr(hostcaps, "UNPRIVILEGED_UFFD", str(sysctl))
    monkeypatch.setattr(hostcaps, "userfaultfd_available", lambda: True)
    hostcaps.require_postcopy(confined=False)
    with pytest.raises(UnsupportedError, match=r"vm\.unprivileged_userfaultfd=1"):
        hostcaps.require_postcopy(confined=True)
    sysctl.write_text("1\n")
    hostcaps.require_postcopy(confined=True)


def test_a_confined_qemus_socket_dir_is_its_users_and_a_strangers_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    monkeypatch.setattr(confine.tempfile, "gettempdir", lambda: str(tmp_path))
    conf = confine.Confinement("qemu-test", 4321, 4322, ())
    run = tmp_path / "run"
    assert confine.socket_dir(None, run) == run
    path = confine.socket_dir(conf, run)
    st = path.stat()
    assert path.parent == tmp_path and (st.st_uid, st.st_gid, st.st_mode & 0o777) == (
        4321, 4322, 0o700)
    assert confine.socket_dir(conf, run) == path  # the same one next time
    os.chown(path, 1234, 1234)
    with pytest.raises(InvalidInputError, match="refusing to put QEMU's sockets there"):
        confine.socket_dir(conf, run)


def test_the_default_nvram_dir_is_made_reachable_for_a_confined_qemu_and_nothing_else(
        tmp_path: Path) -> None:
    conf = confine.Confinement("qemu-test", 4321, 4322, ())
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    confine.reachable_nvram_dir(None, state, state / "nvram")
    assert not (state / "nvram").exists()
    confine.reachable_nvram_dir(conf, state, tmp_path / "elsewhere")
    assert state.stat().st_mode & 0o777 == 0o700
    confine.reachable_nvram_dir(conf, state, state / "nvram")
    assert state.stat().st_mode & 0o777 == 0o701
    assert (state / "nvram").stat().st_mode & 0o777 == 0o711
