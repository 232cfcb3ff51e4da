"""Celery tasks for domain lifecycle on one host (queue host.<name>).

Each task reads its arguments, runs one agent coroutine and returns JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

from tasks.checked import task
from workers import lifecycle
from workers.agent import HostAgent, get_agent
from workers.errors import FerryError
from workers.heartbeat import list_hosts

P = ParamSpec("P")
T = TypeVar("T")


def _run(fn: Callable[Concatenate[HostAgent, P], Coroutine[Any, Any, T]], *args: P.args,
         **kwargs: P.kwargs) -> T:
    """Run one lifecycle coroutine on this host's agent; errors name the host."""
    agent = get_agent()
    try:
        return agent.call(fn(agent, *args, **kwargs))
    except FerryError as exc:
        raise exc.at(host=agent.host) from None


@task("define")
def define(xml: str) -> dict[str, Any]:
    return _run(lifecycle.define, xml)


@task("undefine")
def undefine(domain: str) -> dict[str, Any]:
    return _run(lifecycle.undefine, domain)


@task("start")
def start(domain: str, paused: bool = False) -> dict[str, Any]:
    return _run(lifecycle.start, domain, paused)


@task("destroy")
def destroy(domain: str) -> dict[str, Any]:
    return _run(lifecycle.destroy, domain)


@task("suspend")
def suspend(domain: str) -> dict[str, Any]:
    return _run(lifecycle.suspend, domain)


@task("resume")
def resume(domain: str) -> dict[str, Any]:
    return _run(lifecycle.resume, domain)


@task("dominfo")
def dominfo(domain: str) -> dict[str, Any]:
    return _run(lifecycle.dominfo, domain)


@task("list")
def list_domains(all: bool = False) -> list[dict[str, Any]]:
    return _run(lifecycle.list_domains, all)


@task("dumpxml")
def dumpxml(domain: str, inactive: bool = False, migratable: bool = False) -> str:
    return _run(lifecycle.dumpxml, domain, inactive, migratable)


@task("domblkstat")
def domblkstat(domain: str, device: str | None = None) -> dict[str, Any]:
    return _run(lifecycle.domblkstat, domain, device)


@task("domblkinfo")
def domblkinfo(domain: str, device: str) -> dict[str, Any]:
    return _run(lifecycle.domblkinfo, domain, device)


@task("qemu_monitor_command")
def qemu_monitor_command(domain: str, command: str, hmp: bool = False) -> Any:
    return _run(lifecycle.monitor_command, domain, command, hmp)


@task("domlocks")
def domlocks(domain: str) -> dict[str, Any]:
    return _run(lifecycle.domlocks, domain)


@task("hosts")
def hosts() -> list[dict[str, Any]]:
    return list_hosts(get_agent().redis)
