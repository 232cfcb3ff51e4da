"""Job signals: the sender and the job owner's handlers agree on the operations."""

from __future__ import annotations

from workers.jobsignals import handlers
from workers.jobsignals.protocol import OPS, job_channel


def test_every_operation_a_client_may_send_has_a_handler_and_no_more() -> None:
    assert sorted(handlers.HANDLERS) == sorted(OPS)


def test_a_jobs_signals_go_to_its_domains_channel() -> None:
    assert job_channel("dcf47dbd-46d1-4d5b-b442-262a806a333a") == \
        "ferry.job.dcf47dbd-46d1-4d5b-b442-262a806a333a"
