"""Storage copy parameters: flags, disks, port, and the combinations libvirt refuses."""

from __future__ import annotations

import json

import pytest

from tasks.migrate_client import build_chain, params_from_options
from workers.errors import InvalidInputError, UnsupportedError
from workers.migration.params import MigrationFlags, MigrationParams


def test_storage_flags_have_libvirts_bit_values() -> None:
    assert MigrationFlags.NON_SHARED_DISK == 64
    assert MigrationFlags.NON_SHARED_INC == 128


def test_copy_storage_options_become_libvirts_flags() -> None:
    p = params_from_options("g", "a", "b", live=True, copy_storage_all=True)
    assert p.fl == MigrationFlags.LIVE | MigrationFlags.NON_SHARED_DISK
    assert p.storage_copy and not p.storage_inc
    assert p.flag_names() == ["live", "non_shared_disk"]
    q = params_from_options("g", "a", "b", copy_storage_inc=True)
    assert q.storage_copy and q.storage_inc


def test_migrate_disks_is_taken_as_virshs_comma_list_or_a_python_list() -> None:
    p = params_from_options("g", "a", "b", copy_storage_all=True, migrate_disks="vda, vdb")
    assert p.migrate_disks == ("vda", "vdb")
    q = params_from_options("g", "a", "b", copy_storage_all=True, migrate_disks=["vdc"])
    assert q.migrate_disks == ("vdc",)
    r = params_from_options("g", "a", "b", copy_storage_all=True, migrate_disks=None)
    assert r.migrate_disks == ()


def test_storage_parameters_survive_json_as_send_task_carries_them() -> None:
    p = MigrationParams("g", "a", "b", flags=1 | 64, migrate_disks=("vda",), disks_port=39010)
    again = MigrationParams.from_json(json.loads(json.dumps(p.to_json())))
    assert again == p
    assert again.migrate_disks == ("vda",)
    sent = json.loads(json.dumps(build_chain(p).tasks[0].args[0]))
    assert sent["migrate_disks"] == ["vda"] and sent["flags"] == 65


@pytest.mark.parametrize("kwargs, needle", [
    ({"flags": 64 | 128}, "mutually exclusive"),
    ({"flags": 64 | 2 | 4}, "tunnelled"),
    ({"flags": 64 | 1024 | 8}, "offline"),
    ({"flags": 64, "protocol": 2}, "protocol v3"),
    ({"flags": 128, "protocol": 2}, "NBD port"),
    ({"migrate_disks": ("vda",)}, "need a storage copy"),
    ({"disks_port": 39000}, "need a storage copy"),
    ({"flags": 64, "migrate_disks": ("vda", "vda")}, "twice"),
    ({"flags": 64, "disks_port": 70000}, "1-65535"),
    ({"flags": 64, "disks_port": "12"}, "integer"),
    ({"flags": 64, "migrate_disks": ("vda", 3)}, "disk targets"),
    ({"flags": 64, "migrate_disks": "vda"}, "disk targets"),
])
def test_storage_copy_combinations_libvirt_refuses_are_refused_before_anything_starts(
        kwargs: dict[str, object], needle: str) -> None:
    base: dict[str, object] = {"domain": "g", "source": "a", "dest": "b"}
    base.update(kwargs)
    with pytest.raises(InvalidInputError, match=needle):
        MigrationParams(**base)  # type: ignore[arg-type]


def test_v2_storage_copy_is_an_unsupported_error_naming_the_cookie() -> None:
    with pytest.raises(UnsupportedError, match="cookie"):
        MigrationParams("g", "a", "b", flags=64, protocol=2)
