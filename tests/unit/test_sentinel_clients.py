"""With a Sentinel URL every client goes through the sentinels (no server needed here:
clients connect lazily, so their options can be read)."""

from __future__ import annotations

import ssl
from pathlib import Path

import redis.asyncio.sentinel as asentinel
import redis.sentinel

from config import broker
from config.celery_app import client_app
from config.settings import load

URL = "sentinel://:masterpw@127.0.0.1:26379/3;sentinel://:masterpw@127.0.0.1:26380/3"


def test_a_blocking_client_asks_the_sentinels_for_the_named_master() -> None:
    settings = load({"FERRY_BROKER_URL": URL, "FERRY_SENTINEL_MASTER": "prod",
                     "FERRY_SENTINEL_PASSWORD": "sentpw", "FERRY_BROKER_RETRY_S": "7"})
    client = broker.connect(settings, retry=True, socket_timeout=5)
    pool = client.connection_pool
    assert isinstance(client, broker.RetryingRedis) and client.retry_s == 7
    assert client.replica_wait_ms == 1000  # Sentinel: guarded writes wait for a replica
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert pool.service_name == "prod" and pool.is_master
    assert pool.connection_class is redis.sentinel.SentinelManagedConnection
    kw = pool.connection_kwargs
    assert (kw["db"], kw["password"], kw["socket_timeout"]) == (3, "masterpw", 5)
    manager = pool.sentinel_manager
    assert [s.connection_pool.connection_kwargs["port"] for s in manager.sentinels] == \
        [26379, 26380]
    assert manager.sentinel_kwargs["password"] == "sentpw"
    assert manager.sentinel_kwargs["socket_connect_timeout"] == broker.SENTINEL_TIMEOUT_S


def test_a_plain_client_and_an_async_one_too() -> None:
    settings = load({"FERRY_BROKER_URL": URL})
    plain = broker.connect(settings)
    assert plain.retry_s == 0 and plain.replica_wait_ms == 1000
    assert isinstance(plain.connection_pool, redis.sentinel.SentinelConnectionPool)
    assert plain.connection_pool.service_name == "ferry"
    aclient = broker.connect_async(settings, socket_timeout=3)
    apool = aclient.connection_pool
    assert isinstance(apool, asentinel.SentinelConnectionPool)
    assert apool.service_name == "ferry" and apool.connection_kwargs["db"] == 3
    assert "password" not in apool.sentinel_manager.sentinel_kwargs  # none set


def test_tls_with_a_sentinel_url_follows_the_ca_setting(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    assert not broker.uses_tls(load({"FERRY_BROKER_URL": URL}))
    settings = load({"FERRY_BROKER_URL": URL, "FERRY_REDIS_CA": str(ca)})
    assert broker.uses_tls(settings)
    pool = broker.connect(settings).connection_pool
    assert pool.connection_class is redis.sentinel.SentinelManagedSSLConnection
    assert pool.connection_kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert pool.connection_kwargs["ssl_check_hostname"] is True
    sentinel_kw = broker.sentinel_kwargs(settings)
    assert sentinel_kw["ssl"] is True and sentinel_kw["ssl_ca_certs"] == str(ca)
    assert sentinel_kw["ssl_check_hostname"] is True


def test_celery_gets_the_sentinel_transport_options_for_broker_and_backend() -> None:
    settings = load({"FERRY_BROKER_URL": URL, "FERRY_SENTINEL_MASTER": "prod",
                     "FERRY_SENTINEL_PASSWORD": "sentpw"})
    conf = client_app(settings).conf
    assert conf.broker_url == URL and conf.result_backend == URL
    broker_opts = conf.broker_transport_options
    assert broker_opts["master_name"] == "prod"
    assert broker_opts["sentinel_kwargs"]["password"] == "sentpw"
    assert broker_opts["visibility_timeout"] == 6 * 3600
    backend_opts = conf.result_backend_transport_options
    assert backend_opts["master_name"] == "prod"
    assert backend_opts["sentinel_kwargs"]["password"] == "sentpw"


def test_celery_builds_its_sentinel_transport_and_backend() -> None:
    app = client_app(load({"FERRY_BROKER_URL": URL, "FERRY_SENTINEL_MASTER": "prod"}))
    from celery.backends.redis import SentinelBackend
    from kombu.transport.redis import SentinelChannel

    assert isinstance(app.backend, SentinelBackend)
    with app.connection_for_write() as conn:
        assert conn.transport.Channel is SentinelChannel
        assert conn.transport_options["master_name"] == "prod"


def test_plain_urls_get_no_sentinel_options() -> None:
    settings = load({"FERRY_BROKER_URL": "redis://127.0.0.1:6379/0"})
    assert broker.connect(settings, retry=True).replica_wait_ms == 0  # never waits
    assert broker.celery_transport_options(settings) == {}
    assert broker.lost_connection_note(settings) == ""
    assert "result_backend_transport_options" not in {
        k for k, v in client_app(settings).conf.items() if v}
    assert broker.master_address(settings) is None
    assert "failover" in broker.lost_connection_note(load({"FERRY_BROKER_URL": URL}))


def _state(port: int, epoch: int, **flags: bool) -> dict[str, object]:
    return {"ip": "10.0.0.9", "port": port, "config-epoch": epoch, "is_master": True,
            "is_sdown": False, "is_odown": False, "num-other-sentinels": 2, **flags}


def test_discovery_goes_by_the_newest_view_of_the_sentinels() -> None:
    # a sentinel that has not heard of the failover names the old master (epoch 3);
    # the one that led it names the new one (epoch 4), whatever the order of answers
    lagging, leader = _state(6379, 3), _state(6380, 4)
    assert broker.newest_master([lagging, leader]) == ("10.0.0.9", 6380)
    assert broker.newest_master([leader, lagging]) == ("10.0.0.9", 6380)
    assert broker.newest_master([_state(6380, 9, is_sdown=True), lagging]) == \
        ("10.0.0.9", 6379)
    assert broker.newest_master([_state(6380, 9, is_odown=True)]) is None
    assert broker.newest_master([_state(6380, 9, is_master=False)]) is None
    assert broker.newest_master([leader], min_other_sentinels=3) is None
    assert broker.newest_master([]) is None
