"""Celery tasks for save, restore and dump on one host (queue host.<name>).

Each reads its arguments, runs one agent coroutine (workers/image_jobs.py)
and returns JSON.  The job id is the task id, so the job record and the
task's PROGRESS state (QEMU's figures, for Flower) belong together.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from tasks.checked import task
from workers import errors, image_jobs
from workers.agent import HostAgent, get_agent
from workers.errors import FerryError

T = TypeVar("T")


def _portable(exc: FerryError) -> FerryError:
    """The same error as a class of workers.errors, which every client can rebuild."""
    for cls in type(exc).__mro__:
        known = getattr(errors, cls.__name__, None) is cls
        if known and issubclass(cls, FerryError):
            return cls(exc.message, exc.phase, exc.host, exc.cause)
    return FerryError(exc.message, exc.phase, exc.host, exc.cause)


def _run(task: Any, make: Callable[[HostAgent, str], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine `make(agent, job_id)`; report the job's progress while it runs."""
    agent = get_agent()
    job_id = str(task.request.id or "") or None

    def tick() -> None:
        for dom in list(agent.domains.values()):
            job = dom.job
            if job is not None and job.id == job_id and job.progress:
                task.update_state(state="PROGRESS", meta=job.progress)

    try:
        return agent.call(make(agent, job_id or ""), tick=tick if job_id else None)
    except FerryError as exc:
        raise _portable(exc.at(host=agent.host)) from None


@task("save", bind=True)
def save(self: Any, domain: str, path: str, compression: str = "raw", running: bool = False,
         paused: bool = False, bypass_cache: bool = False) -> dict[str, Any]:
    return _run(self, lambda agent, job_id: image_jobs.save(
        agent, domain, path, compression=compression, running=running, paused=paused,
        bypass_cache=bypass_cache, job_id=job_id or None))


@task("restore", bind=True)
def restore(self: Any, path: str, xml: str | None = None, running: bool = False,
            paused: bool = False) -> dict[str, Any]:
    return _run(self, lambda agent, job_id: image_jobs.restore(
        agent, path, xml=xml, running=running, paused=paused, job_id=job_id or None))


@task("dump", bind=True)
def dump(self: Any, domain: str, path: str, memory_only: bool = False, format: str = "elf",
         live: bool = False) -> dict[str, Any]:
    return _run(self, lambda agent, job_id: image_jobs.dump(
        agent, domain, path, memory_only=memory_only, format=format, live=live,
        job_id=job_id or None))
