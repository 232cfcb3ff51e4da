"""Bad input: one clear line, a non-zero exit, nothing defined or started."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from scripts.testbed.stack import Stack
from tasks.client import Client
from tests.conftest import CliResult, Guest, qemu_pids_of

ENTITY = """<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY x "xxxxxxxxxx"><!ENTITY y "&x;&x;&x;&x;&x;&x;&x;&x;">]>
<domain type='kvm'><name>&y;</name><memory>65536</memory></domain>"""


def _mutations(xml: str) -> dict[str, tuple[str, str]]:
    name = re.search(r"<name>(.*?)</name>", xml)
    assert name is not None
    return {
        "malformed": (xml.replace("</domain>", ""), "XML"),
        "entity": (ENTITY, "entit"),
        "unknown device": (xml.replace("<memballoon", "<hostdev mode='subsystem'/><memballoon"),
                           "hostdev"),
        "missing name": (xml.replace(name.group(0), ""), "name"),
        "memory zero": (re.sub(r"<memory unit='MiB'>\d+</memory>", "<memory unit='MiB'>0</memory>",
                               xml), "memory"),
        "absurd memory": (re.sub(r"<memory unit='MiB'>\d+</memory>",
                                 "<memory unit='TiB'>4096</memory>", xml), "memory"),
        "slash in name": (xml.replace(name.group(0), "<name>a/b</name>"), "name"),
        "dotdot in name": (xml.replace(name.group(0), "<name>a..b</name>"), "name"),
        "absurd vcpus": (re.sub(r"<vcpu>\d+</vcpu>", "<vcpu>4096</vcpu>", xml), "vcpu"),
        "qemu commandline": (xml.replace(
            "<domain type='kvm'>",
            "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>").replace(
            "</devices>", "</devices><qemu:commandline><qemu:arg value='-S'/></qemu:commandline>"),
            "commandline"),
    }


CASES = ["malformed", "entity", "unknown device", "missing name", "memory zero",
         "absurd memory", "absurd vcpus", "slash in name", "dotdot in name", "qemu commandline"]


def _names(ferry: Callable[..., CliResult]) -> list[str]:
    res = ferry("list", "-H", "alpha", "--all", "--json")
    assert res.rc == 0, res.err
    return sorted(d["name"] for d in json.loads(res.out))


def _one_line_error(res: CliResult, needle: str) -> None:
    assert res.rc != 0
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    assert lines[0].startswith("error: ")
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in res.err


@pytest.mark.parametrize("case", CASES)
def test_bad_definition_is_refused_with_one_line_and_defines_nothing(
        case: str, ferry: Callable[..., CliResult], make_guest: Callable[..., Guest],
        tmp_path: Path, stack: Stack) -> None:
    xml, needle = _mutations(make_guest().xml)[case]
    before = _names(ferry)
    pids_before = stack.guest_pids()
    path = tmp_path / "bad.xml"
    path.write_text(xml)

    _one_line_error(ferry("define", "-H", "alpha", str(path)), needle)

    assert _names(ferry) == before
    assert stack.guest_pids() == pids_before


def test_duplicate_name_with_another_uuid_is_refused(
        ferry: Callable[..., CliResult], make_guest: Callable[..., Guest],
        tmp_path: Path) -> None:
    guest = make_guest()
    (tmp_path / "a.xml").write_text(guest.xml)
    assert ferry("define", "-H", "alpha", str(tmp_path / "a.xml")).rc == 0
    other = make_guest()
    (tmp_path / "b.xml").write_text(other.xml.replace(other.name, guest.name))
    before = _names(ferry)

    _one_line_error(ferry("define", "-H", "alpha", str(tmp_path / "b.xml")), "already exists")
    assert _names(ferry) == before
    info = json.loads(ferry("dominfo", "-H", "alpha", guest.name, "--json").out)
    assert info["uuid"] == guest.uuid


def test_duplicate_uuid_under_another_name_is_refused(
        ferry: Callable[..., CliResult], make_guest: Callable[..., Guest],
        tmp_path: Path) -> None:
    guest = make_guest()
    (tmp_path / "a.xml").write_text(guest.xml)
    assert ferry("define", "-H", "alpha", str(tmp_path / "a.xml")).rc == 0
    other = make_guest()
    (tmp_path / "b.xml").write_text(other.xml.replace(other.uuid, guest.uuid))
    before = _names(ferry)

    _one_line_error(ferry("define", "-H", "alpha", str(tmp_path / "b.xml")), guest.uuid)
    assert _names(ferry) == before


def test_starting_an_undefined_domain_is_a_clear_error(
        ferry: Callable[..., CliResult], stack: Stack) -> None:
    pids_before = stack.guest_pids()
    _one_line_error(ferry("start", "-H", "alpha", "no-such-guest"), "not found")
    assert stack.guest_pids() == pids_before


def test_a_host_that_does_not_exist_is_a_clear_error_not_a_hang(
        ferry: Callable[..., CliResult]) -> None:
    res = ferry("list", "-H", "nosuchhost", timeout=15)
    _one_line_error(res, "nosuchhost")
    assert "not alive" in res.err


def test_a_file_that_cannot_be_read_is_a_clear_error(ferry: Callable[..., CliResult]) -> None:
    _one_line_error(ferry("define", "-H", "alpha", "/nonexistent/dom.xml"), "cannot read")


# exec:, fd:, rdma: and port 0 are refused by the same parser (tests/unit/test_migration_logic)
@pytest.mark.parametrize("uri, needle", [
    ("file:/tmp/ferry-x", "scheme 'file'"),
    ("tcp:127.0.0.1:70000", "port is not 1-65535"),
    ("tcp:no-such-host.invalid:49999", "'no-such-host.invalid' is unknown on host beta"),
])
def test_a_bad_migration_uri_is_refused_and_the_guest_runs_on_where_it_was(
        uri: str, needle: str, ferry: Callable[..., CliResult], client: Client,
        make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(domain_type="qemu")
    client.call("alpha", "define", xml=guest.xml)
    pid = client.call("alpha", "start", domain=guest.name)["pid"]
    beta_before = client.call("beta", "list", all=True)

    _one_line_error(ferry("migrate", "-H", "alpha", guest.name, "beta", "--live",
                          "--migrateuri", uri), needle)

    info = client.call("alpha", "dominfo", domain=guest.name)
    assert (info["state"], info["reason"], info["pid"]) == ("running", "booted", pid)
    assert qemu_pids_of(guest.uuid) == [pid]
    assert client.call("beta", "list", all=True) == beta_before
    assert client.call("alpha", "domjobinfo", domain=guest.name)["type"] == "none"


def test_a_migration_to_a_host_that_does_not_exist_is_refused_before_anything_starts(
        ferry: Callable[..., CliResult], client: Client,
        make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(domain_type="qemu")
    client.call("alpha", "define", xml=guest.xml)
    pid = client.call("alpha", "start", domain=guest.name)["pid"]
    _one_line_error(ferry("migrate", "-H", "alpha", guest.name, "nosuchhost", "--live",
                          timeout=30), "nosuchhost")
    info = client.call("alpha", "dominfo", domain=guest.name)
    assert (info["state"], info["pid"]) == ("running", pid)
    assert client.call("alpha", "domjobinfo", domain=guest.name)["type"] == "none"
