"""FERRY_BROKER_URL in Celery's Sentinel form, and the settings that go with it."""

from __future__ import annotations

import pytest

from config import sentinel
from config.settings import describe, load
from workers.errors import InvalidInputError

URL = "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://:s3cret@10.0.0.2:26380/2;" \
      "sentinel://10.0.0.3"


def test_a_sentinel_url_is_accepted_with_its_master_and_passwords() -> None:
    s = load({"FERRY_BROKER_URL": URL, "FERRY_SENTINEL_MASTER": "mymaster",
              "FERRY_SENTINEL_PASSWORD": "sentpw"})
    assert s.broker_url == URL
    assert (s.sentinel_master, s.sentinel_password) == ("mymaster", "sentpw")


def test_sentinel_defaults() -> None:
    s = load({})
    assert (s.sentinel_master, s.sentinel_password) == ("ferry", "")
    assert s.replica_wait_ms == 1000


def test_the_url_parts_give_the_sentinels_the_database_and_the_masters_password() -> None:
    parsed = sentinel.parse(URL)
    assert parsed.nodes == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379))
    assert (parsed.db, parsed.password, parsed.username) == (2, "s3cret", None)
    assert parsed.describe() == "10.0.0.1:26379, 10.0.0.2:26380, 10.0.0.3:26379"
    assert sentinel.parse("sentinel://h:1").db == 0
    assert sentinel.parse("sentinel://u:p%40ss@h:1/0").password == "p@ss"


@pytest.mark.parametrize("url, needle", [
    ("sentinel://h:1;redis://h:2", "part 2 of the Sentinel URL is not sentinel://"),
    ("sentinel://h:1;", "part 2 of the Sentinel URL is empty"),
    ("sentinel://:1/0", "part 1 of the Sentinel URL names no host"),
    ("sentinel://h:99999", "bad port"),
    ("sentinel://h:1/zero", "database 'zero', not a number"),
    ("sentinel://h:1/0;sentinel://g:1/3", "different databases (0, 3)"),
    ("sentinel://:a@h:1;sentinel://:b@g:1", "different credentials"),
    ("sentinel://h:1;sentinel://h:1", "names a sentinel twice"),
    ("sentinel://h:1/0?master=x", "query or fragment"),
    ("redis://h:1;sentinel://h:2", "must start with sentinel://"),
    ("http://h:1/0", "scheme 'http' is not one of"),
    ("localhost:6379", "is not one of"),
])
def test_a_bad_broker_url_is_one_line_naming_the_variable(url: str, needle: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        load({"FERRY_BROKER_URL": url})
    text = str(err.value)
    assert text.startswith("FERRY_BROKER_URL: ") and needle in text
    assert "\n" not in text


def test_a_bad_url_never_shows_its_password() -> None:
    with pytest.raises(InvalidInputError) as err:
        load({"FERRY_BROKER_URL": "sentinel://:topsecret@h:1;redis://:topsecret@h:2"})
    assert "topsecret" not in str(err.value)


@pytest.mark.parametrize("env, needle", [
    ({"FERRY_SENTINEL_MASTER": "  "}, "FERRY_SENTINEL_MASTER: must not be empty"),
    ({"FERRY_REPLICA_WAIT_MS": "5"}, "FERRY_REPLICA_WAIT_MS=5 is below 10"),
    ({"FERRY_REPLICA_WAIT_MS": "600000"}, "is above 60000"),
])
def test_bad_sentinel_settings_are_one_clear_error(env: dict[str, str], needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        load(env)


def test_plain_urls_stay_accepted() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://:pw@broker:6380/1",
                "unix:///run/redis.sock"):
        assert load({"FERRY_BROKER_URL": url}).broker_url == url
        assert not sentinel.is_sentinel(url)
    assert sentinel.is_sentinel("SENTINEL://h:1")


def test_the_new_settings_have_a_line_of_help() -> None:
    names = {line.split()[0] for line in describe().splitlines()}
    assert {"FERRY_SENTINEL_MASTER", "FERRY_SENTINEL_PASSWORD",
            "FERRY_REPLICA_WAIT_MS"} <= names
