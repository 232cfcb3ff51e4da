"""Settings come from FERRY_* variables with defaults and bounds, and errors read well."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import broker
from config.celery_app import client_app
from config.settings import describe, load
from workers.errors import FerryError, InvalidInputError, QemuError


def test_defaults_need_no_environment() -> None:
    s = load({})
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.migration_ports == (49152, 49215)
    assert s.allow_qemu_commandline is False
    assert s.lock_manager == "redis"


def test_environment_values_are_parsed_to_their_types() -> None:
    s = load({"FERRY_STATE_DIR": "/tmp/x", "FERRY_MIGRATION_PORTS": "50000-50010",
              "FERRY_ALLOW_QEMU_COMMANDLINE": "yes", "FERRY_HEARTBEAT_TTL_MS": "900",
              "FERRY_HOST_UUID": "C2F1B5F6-1C9E-4E4B-8F3A-000000000001"})
    assert s.state_dir == Path("/tmp/x")
    assert s.migration_ports == (50000, 50010)
    assert s.allow_qemu_commandline is True
    assert s.heartbeat_ttl_ms == 900
    assert s.host_uuid == "c2f1b5f6-1c9e-4e4b-8f3a-000000000001"


def test_overrides_from_worker_flags_win_over_the_environment() -> None:
    s = load({"FERRY_HOST": "envhost"}, host="flaghost", host_uuid=None)
    assert s.host == "flaghost"


@pytest.mark.parametrize("env, needle", [
    ({"FERRY_MIGRATION_PORTS": "5-3"}, "FERRY_MIGRATION_PORTS"),
    ({"FERRY_MIGRATION_PORTS": "abc"}, "FERRY_MIGRATION_PORTS"),
    ({"FERRY_HEARTBEAT_INTERVAL_MS": "1"}, "below 100"),
    ({"FERRY_LOCK_MANAGER": "sanlock"}, "sanlock"),
    ({"FERRY_ALLOW_QEMU_COMMANDLINE": "maybe"}, "boolean"),
    ({"FERRY_HOST_UUID": "not-a-uuid"}, "FERRY_HOST_UUID"),
    ({"FERRY_REDIS_CA": "relative/ca.pem"}, "FERRY_REDIS_CA"),
    ({"FERRY_ALLOWED_DIRS": "/srv/vms:images"}, "FERRY_ALLOWED_DIRS"),
])
def test_bad_values_are_one_clear_error_naming_the_variable(env: dict[str, str],
                                                           needle: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        load(env)
    assert needle in str(err.value)


def test_every_setting_has_a_line_of_help() -> None:
    lines = describe().splitlines()
    assert any(line.startswith("FERRY_BROKER_URL") for line in lines)
    assert all(len(line.split(None, 1)) == 2 for line in lines)


def test_errors_say_where_they_happened_and_survive_a_json_round_trip() -> None:
    err = QemuError("QEMU refused cont", cause="GenericError").at(phase="finish3", host="beta")
    assert str(err) == "phase finish3, host beta: QEMU refused cont (GenericError)"
    rebuilt = QemuError(*err.args)
    assert str(rebuilt) == str(err) and isinstance(rebuilt, FerryError)
    assert err.to_dict()["type"] == "QemuError"


def test_a_rediss_broker_is_always_verified_against_the_configured_ca() -> None:
    import ssl

    s = load({"FERRY_BROKER_URL": "rediss://broker:6380/0", "FERRY_REDIS_CA": "/etc/ca.pem",
              "FERRY_REDIS_CERT": "/etc/me.crt", "FERRY_REDIS_KEY": "/etc/me.key"})
    want = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/ca.pem",
            "ssl_certfile": "/etc/me.crt", "ssl_keyfile": "/etc/me.key"}
    assert broker.ssl_options(s) == want
    conf = client_app(s).conf
    assert conf.broker_use_ssl == want and conf.redis_backend_use_ssl == want
    pool = broker.connect(s).connection_pool.connection_kwargs
    assert pool["ssl_cert_reqs"] == ssl.CERT_REQUIRED and pool["ssl_check_hostname"] is True
    assert broker.ssl_options(load({"FERRY_BROKER_URL": "rediss://b/0"})) == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED}


@pytest.mark.parametrize("env, needle", [
    ({"FERRY_SIGNING_KEY": "/k.pem"}, "together"),
    ({"FERRY_SIGNING_KEY": "/nonexistent/k.pem", "FERRY_SIGNING_CERT": "/nonexistent/c.pem",
      "FERRY_SIGNING_CERT_STORE": "/nonexistent/store"}, "/nonexistent/k.pem"),
])
def test_message_signing_needs_all_three_files(env: dict[str, str], needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        client_app(load(env))


def test_signing_is_off_by_default_and_messages_are_json() -> None:
    conf = client_app(load({})).conf
    assert (conf.task_serializer, conf.accept_content) == ("json", ["json"])


def test_a_plain_redis_broker_has_no_tls_options() -> None:
    s = load({"FERRY_REDIS_CA": "/etc/ca.pem"})
    assert broker.ssl_options(s) is None
    assert client_app(s).conf.broker_use_ssl is False
