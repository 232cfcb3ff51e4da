"""The worker's replacements of kombu's and Celery's methods are checked against the
releases they were written for, and refused (with a log line) on anything else."""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import celery
import kombu
import pytest

from config import kombu_patches
from config.kombu_patches import (
    BASIC_ACK,
    CONN_OR_ACQUIRE,
    CONNECTION_LOST,
    REPLACEMENTS,
    WRITTEN_FOR,
    Replacement,
)
from config.settings import load

REREAD = ("re-read the new source, adapt the replacement in config/kombu_patches.py, then "
          "record the new signature, source hash and release there (and the pin in "
          "pyproject.toml)")


@pytest.fixture(autouse=True)
def restored_methods(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every replaced method is put back after each test."""
    for r in REPLACEMENTS:
        monkeypatch.setattr(r.owner, r.name, getattr(r.owner, r.name))
    yield


def _current(r: Replacement) -> Callable[..., Any]:
    method: Callable[..., Any] = getattr(r.owner, r.name)
    return method


def _parameters(method: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]


def _apply_all() -> None:
    kombu_patches.survive_broker_restarts(load({}))
    kombu_patches.reuse_publish_clients()


@pytest.mark.parametrize("package", sorted(WRITTEN_FOR))
def test_installed_release_is_one_the_replacements_were_written_for(package: str) -> None:
    installed = kombu_patches.installed_version(package)
    assert installed in WRITTEN_FOR[package], (
        f"{package} {installed} is installed; the replacements were written for "
        f"{', '.join(WRITTEN_FOR[package])}: {REREAD}")


@pytest.mark.parametrize("r", REPLACEMENTS, ids=lambda r: r.qualname)
def test_replaced_method_has_the_signature_it_was_written_against(r: Replacement) -> None:
    signature = str(inspect.signature(_current(r)))
    assert signature == r.signature, (
        f"{r.qualname} now has signature {signature}, the replacement was written "
        f"against {r.signature}: {REREAD}")


@pytest.mark.parametrize("r", REPLACEMENTS, ids=lambda r: r.qualname)
def test_replaced_method_has_the_source_it_was_written_against(r: Replacement) -> None:
    digest = hashlib.sha256(inspect.getsource(_current(r)).encode()).hexdigest()
    assert digest == r.source_sha256, (
        f"{r.qualname} changed (source sha256 {digest}, the replacement was written "
        f"against {r.source_sha256}): {REREAD}")


@pytest.mark.parametrize("r", REPLACEMENTS, ids=lambda r: r.qualname)
def test_attributes_a_replacement_uses_exist(r: Replacement) -> None:
    assert all(hasattr(r.owner, a) for a in r.relies_on), r.relies_on


def test_on_the_written_for_releases_every_method_is_replaced(
        caplog: pytest.LogCaptureFixture) -> None:
    plain = {r: _current(r) for r in REPLACEMENTS}
    with caplog.at_level(logging.WARNING, logger="config.kombu_patches"):
        _apply_all()
    assert not caplog.records
    for r in REPLACEMENTS:
        assert _current(r) is not plain[r], r.qualname
        # the replacement takes what the method took (callers are unchanged)
        assert _parameters(_current(r)) == _parameters(plain[r]), r.qualname


def test_a_second_call_keeps_the_first_replacement() -> None:
    _apply_all()
    first = {r: _current(r) for r in REPLACEMENTS}
    _apply_all()
    assert all(_current(r) is first[r] for r in REPLACEMENTS)


def test_config_celery_app_applies_them() -> None:
    from config.celery_app import reuse_publish_clients, survive_broker_restarts

    plain = {r: _current(r) for r in REPLACEMENTS}
    survive_broker_restarts(load({}))
    reuse_publish_clients()
    assert all(_current(r) is not plain[r] for r in REPLACEMENTS)


def test_another_kombu_release_is_refused_and_logged(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(kombu, "__version__", "5.8.0")
    plain = {r: _current(r) for r in REPLACEMENTS}
    with caplog.at_level(logging.WARNING, logger="config.kombu_patches"):
        _apply_all()
    # kombu's methods stay kombu's own; Celery's (its release unchanged) is replaced
    assert _current(BASIC_ACK) is plain[BASIC_ACK]
    assert _current(CONN_OR_ACQUIRE) is plain[CONN_OR_ACQUIRE]
    assert _current(CONNECTION_LOST) is not plain[CONNECTION_LOST]
    messages = [rec.getMessage() for rec in caplog.records]
    assert len(messages) == 2, messages
    for r, text in zip((BASIC_ACK, CONN_OR_ACQUIRE), messages, strict=True):
        assert text.startswith(f"not replacing {r.qualname}: kombu 5.8.0 is installed, "
                               f"the replacement was written for kombu 5.7.0"), text
        assert r.without in text


def test_another_celery_release_is_refused_and_logged(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(celery, "__version__", "5.6.2")
    plain = _current(CONNECTION_LOST)
    with caplog.at_level(logging.WARNING, logger="config.kombu_patches"):
        kombu_patches.survive_broker_restarts(load({}))
    assert _current(CONNECTION_LOST) is plain
    assert [rec.getMessage() for rec in caplog.records] == [
        f"not replacing {CONNECTION_LOST.qualname}: celery 5.6.2 is installed, the "
        f"replacement was written for celery 5.7.0; without it {CONNECTION_LOST.without}"]


def test_a_changed_signature_is_refused_and_logged(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # a later kombu's, say (unannotated, as kombu's are)
    basic_ack = lambda self, delivery_tag, multiple=False, requeue=False: None  # noqa: E731

    monkeypatch.setattr(BASIC_ACK.owner, "basic_ack", basic_ack)
    with caplog.at_level(logging.WARNING, logger="config.kombu_patches"):
        kombu_patches.survive_broker_restarts(load({}))
    assert _current(BASIC_ACK) is basic_ack
    [text] = [rec.getMessage() for rec in caplog.records]
    assert "has signature (self, delivery_tag, multiple=False, requeue=False)" in text
    assert "written for (self, delivery_tag, multiple=False)" in text


def test_a_missing_attribute_the_replacement_uses_is_refused(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delattr(CONN_OR_ACQUIRE.owner, "_create_client")
    plain = _current(CONN_OR_ACQUIRE)
    with caplog.at_level(logging.WARNING, logger="config.kombu_patches"):
        kombu_patches.reuse_publish_clients()
    assert _current(CONN_OR_ACQUIRE) is plain
    [text] = [rec.getMessage() for rec in caplog.records]
    assert "has no _create_client" in text
