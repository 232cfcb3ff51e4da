"""A guest arriving on a host (migrated in, restored) starts in a new object or in the
inactive definition of itself; a uuid or a name held by another guest is refused."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from workers.domain import DomainDef
from workers.domobj import DomainObj
from workers.errors import InvalidInputError, OperationInvalidError
from workers.job_types import JobOperation, Phase
from workers.jobs import ActiveJob
from workers.lifecycle import inactive_domain_for

UUID = "dcf47dbd-46d1-4d5b-b442-262a806a333a"
OTHER = "0b9d6f44-7d57-4b2c-9a43-5d1f8c1c2e11"


def _agent(*doms: DomainObj) -> Any:
    return SimpleNamespace(domains={d.name: d for d in doms})


def _def(name: str, uuid: str) -> DomainDef:
    return DomainDef(name=name, uuid=uuid, memory_kib=65536)


def test_a_new_guest_gets_a_new_object() -> None:
    assert inactive_domain_for(_agent(), _def("g", UUID), "restore") is None


def test_an_inactive_definition_of_the_same_guest_is_reused() -> None:
    dom = DomainObj(definition=_def("g", UUID))
    assert inactive_domain_for(_agent(dom), _def("g", UUID), "migrate in") is dom


def test_its_uuid_under_another_name_is_refused() -> None:
    agent = _agent(DomainObj(definition=_def("h", UUID)))
    with pytest.raises(InvalidInputError, match=f"uuid {UUID} already exists as 'h'"):
        inactive_domain_for(agent, _def("g", UUID), "restore")


def test_its_name_with_another_uuid_is_refused() -> None:
    agent = _agent(DomainObj(definition=_def("g", OTHER)))
    with pytest.raises(InvalidInputError, match=f"'g' already exists with uuid {OTHER}"):
        inactive_domain_for(agent, _def("g", UUID), "migrate in")


def test_a_definition_in_a_job_is_refused() -> None:
    dom = DomainObj(definition=_def("g", UUID))
    dom.job = ActiveJob("j", JobOperation.SAVE, Phase.SAVE, 1.0)
    with pytest.raises(OperationInvalidError, match=r"cannot restore: .* is in job j"):
        inactive_domain_for(_agent(dom), _def("g", UUID), "restore")
