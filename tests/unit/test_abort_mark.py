"""An abort's mark in the job record lands on that job's record only, whenever it comes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from workers.errors import OperationInvalidError
from workers.job_types import SWITCHED_OVER, TOO_LATE
from workers.jobs import JobStore, job_key


@pytest.fixture
def store(redis_server: int) -> Iterator[JobStore]:
    client = redis.Redis(port=redis_server, password="pw", db=5, socket_timeout=5)
    client.flushdb()
    yield JobStore(client, "alpha")
    client.close()


def test_the_mark_lands_on_the_running_jobs_record(store: JobStore) -> None:
    store.redis.hset(job_key("u1"), mapping={"id": "job-1", "phase": "perform3"})
    assert store.mark_aborted("u1", "job-1")
    assert store.abort_requested("u1", "job-1")


def test_a_late_mark_leaves_the_next_jobs_record_alone(store: JobStore) -> None:
    store.redis.hset(job_key("u1"), mapping={"id": "job-2", "phase": "begin3"})
    assert not store.mark_aborted("u1", "job-1")
    assert store.redis.hget(job_key("u1"), "abort") is None
    assert not store.abort_requested("u1", "job-2")


def test_a_mark_after_the_job_ended_makes_no_half_record(store: JobStore) -> None:
    assert not store.mark_aborted("u1", "job-1")
    assert not store.mark_aborted("u1")
    assert not store.redis.exists(job_key("u1"))


def test_a_callers_abort_marks_whatever_job_runs(store: JobStore) -> None:
    store.redis.hset(job_key("u1"), mapping={"id": "job-3", "phase": "begin3"})
    assert store.request_abort("u1")
    assert store.abort_requested("u1", "job-3")


def test_a_callers_abort_past_the_switch_over_is_refused_and_marks_nothing(
        store: JobStore) -> None:
    phase = sorted(SWITCHED_OVER)[0]
    store.redis.hset(job_key("u1"), mapping={"id": "job-4", "phase": phase})
    with pytest.raises(OperationInvalidError, match=TOO_LATE):
        store.request_abort("u1")
    assert store.redis.hget(job_key("u1"), "abort") is None
