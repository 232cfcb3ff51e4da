"""Celery tasks for domain lifecycle on one host (queue host.<name>).

Each task reads its arguments, runs one agent coroutine and returns JSON.
"""

from __future__ import annotations

from typing import Any

from config.celery_app import app
from tasks.checked import checked
from workers import lifecycle
from workers.agent import get_agent
from workers.errors import FerryError
from workers.heartbeat import list_hosts


def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one lifecycle coroutine on this host's agent; errors name the host."""
    agent = get_agent()
    try:
        return agent.call(fn(agent, *args, **kwargs))
    except FerryError as exc:
        raise exc.at(host=agent.host) from None


@app.task(name="ferry.define")
@checked
def define(xml: str) -> dict[str, Any]:
    return _run(lifecycle.define, xml)


@app.task(name="ferry.undefine")
@checked
def undefine(domain: str) -> dict[str, Any]:
    return _run(lifecycle.undefine, domain)


@app.task(name="ferry.start")
@checked
def start(domain: str, paused: bool = False) -> dict[str, Any]:
    return _run(lifecycle.start, domain, paused)


@app.task(name="ferry.destroy")
@checked
def destroy(domain: str) -> dict[str, Any]:
    return _run(lifecycle.destroy, domain)


@app.task(name="ferry.suspend")
@checked
def suspend(domain: str) -> dict[str, Any]:
    return _run(lifecycle.suspend, domain)


@app.task(name="ferry.resume")
@checked
def resume(domain: str) -> dict[str, Any]:
    return _run(lifecycle.resume, domain)


@app.task(name="ferry.dominfo")
@checked
def dominfo(domain: str) -> dict[str, Any]:
    return _run(lifecycle.dominfo, domain)


@app.task(name="ferry.list")
@checked
def list_domains(all: bool = False) -> list[dict[str, Any]]:
    return _run(lifecycle.list_domains, all)


@app.task(name="ferry.dumpxml")
@checked
def dumpxml(domain: str, inactive: bool = False, migratable: bool = False) -> str:
    return _run(lifecycle.dumpxml, domain, inactive, migratable)


@app.task(name="ferry.domblkstat")
@checked
def domblkstat(domain: str, device: str | None = None) -> dict[str, Any]:
    return _run(lifecycle.domblkstat, domain, device)


@app.task(name="ferry.domblkinfo")
@checked
def domblkinfo(domain: str, device: str) -> dict[str, Any]:
    return _run(lifecycle.domblkinfo, domain, device)


@app.task(name="ferry.qemu_monitor_command")
@checked
def qemu_monitor_command(domain: str, command: str, hmp: bool = False) -> Any:
    return _run(lifecycle.monitor_command, domain, command, hmp)


@app.task(name="ferry.domlocks")
@checked
def domlocks(domain: str) -> dict[str, Any]:
    return _run(lifecycle.domlocks, domain)


@app.task(name="ferry.hosts")
@checked
def hosts() -> list[dict[str, Any]]:
    return list_hosts(get_agent().redis)
