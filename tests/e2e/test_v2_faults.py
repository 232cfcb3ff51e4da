"""Protocol v2's failure and abort paths: Prepare, Perform and Finish faults on real parts.

The cases are the v2 rows of tests/e2e/faultcases.py.  Two hosts of the test
stack without a stateful lock manager (v2 refuses one) have failpoints armed
at run time, which only hold a phase still; every fault is a real one.  The
outcome is judged from outside ferry: which QEMU processes of the guest exist
(/proc) and whether QEMU says its CPUs run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import Stack, pid_alive, searchable, wait_for
from tasks.client import Client
from tests.conftest import qemu_pids_of
from tests.e2e.diskfaults import disk_locked
from tests.e2e.faultcases import (
    DEST,
    V2_ERRORS,
    At,
    Outcome,
    V2Case,
    V2Fault,
    v2_cases,
)
from workers.errors import FerryError

SRC, DST = "v2src", "v2dst"


@dataclass
class V2Hosts:
    stack: Stack
    client: Client
    work: Path

    def armed(self, host: str) -> Path:
        return self.stack.root / host / "failpoints"


@pytest.fixture(scope="module")
def v2(stack: Stack, client: Client, tmp_path_factory: pytest.TempPathFactory,
       ) -> Iterator[V2Hosts]:
    hosts = V2Hosts(stack, client, searchable(tmp_path_factory.mktemp("v2")))  # confined QEMU
    try:
        for host in (SRC, DST):
            hosts.armed(host).mkdir(parents=True, exist_ok=True)
            stack.start_worker(host, env={"FERRY_LOCK_MANAGER": "none",
                                          "FERRY_FAILPOINT_DIR": str(hosts.armed(host))})
        yield hosts
    finally:
        for host in (SRC, DST):
            if host in stack.workers:
                stack.remove_worker(host)


@dataclass
class Run:
    case: V2Case
    name: str
    uuid: str
    disk: Path
    src_pid: int
    error: str | None = None
    reply: Any = None
    summary: dict[str, Any] = field(default_factory=dict)


def _host(side: str) -> str:
    return DST if side == DEST else SRC


def _boot(h: V2Hosts, base_image: Path) -> tuple[str, str, Path, int]:
    name, dom_uuid = f"v-{uuidlib.uuid4().hex[:8]}", str(uuidlib.uuid4())
    disk = h.work / f"{name}.img"
    shutil.copyfile(base_image, disk)
    xml = guest_xml(name, disk, h.work / f"{name}.serial", memory_mib=32, uuid=dom_uuid,
                    domain_type="qemu")
    h.client.call(SRC, "define", xml=xml)
    pid = h.client.call(SRC, "start", domain=name)["pid"]
    return name, dom_uuid, disk, pid


def _release(h: V2Hosts, case: V2Case) -> None:
    if case.point is not None:
        side, point = case.point
        for suffix in ("", ".hit"):
            with contextlib.suppress(FileNotFoundError):
                (h.armed(_host(side)) / f"{point}{suffix}").unlink()


def _qemu_of(h: V2Hosts, run: Run, host: str) -> int:
    info = h.client.call(host, "dominfo", domain=run.name)
    assert info["pid"] in qemu_pids_of(run.uuid), f"no QEMU of {run.name} on {host}"
    return int(info["pid"])


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 10, "the QEMU to die")


def _inflict(h: V2Hosts, run: Run, job: Any, stack: contextlib.ExitStack) -> None:
    fault = run.case.fault
    if fault == V2Fault.DST_QEMU:
        _kill(_qemu_of(h, run, DST))
    elif fault == V2Fault.SRC_QEMU:
        _kill(run.src_pid)
    elif fault == V2Fault.DST_DISK_LOCKED:
        stack.enter_context(disk_locked(run.disk))  # the source's QEMU is gone by Finish
    elif fault == V2Fault.ABORT:
        try:
            run.reply = job.abort()
        except FerryError as exc:
            run.reply = {"refused": str(exc)}


def _outcome(h: V2Hosts, run: Run) -> Outcome | None:
    """From outside: the guest's QEMU processes, and whether QEMU runs the CPUs."""
    pids = qemu_pids_of(run.uuid)
    if not pids:
        return Outcome.LOST
    if len(pids) > 1:
        return None  # still moving
    host = SRC if pids == [run.src_pid] else DST
    status = h.client.call(host, "qemu_monitor_command", domain=run.name,
                           command=json.dumps({"execute": "query-status"}))
    if not status["running"]:
        return None
    return Outcome.S if host == SRC else Outcome.D


def _run(h: V2Hosts, base_image: Path, case: V2Case) -> tuple[Run, Outcome | str]:
    name, dom_uuid, disk, pid = _boot(h, base_image)
    run = Run(case, name, dom_uuid, disk, pid)
    if case.fault == V2Fault.DST_START:
        (h.armed(DST) / "prepare3.qemu_argv").write_text("bad-arg")  # QEMU really refuses
    elif case.point is not None:
        side, point = case.point
        (h.armed(_host(side)) / point).write_text("pause")
    with contextlib.ExitStack() as held:
        try:
            speed = {"bandwidth_mib_s": 1} if case.at == At.COPYING else {}
            job = h.client.migrate(name, SRC, DST, live=True, protocol=2, p2p=case.p2p,
                                   **speed)
            if case.fault != V2Fault.DST_START:
                _hold(h, case, job)
                _inflict(h, run, job, held)
                _release(h, case)
                if case.at == At.COPYING:
                    with contextlib.suppress(FerryError):
                        job.set_speed(0)
            try:
                run.summary = job.wait(timeout=90)
            except FerryError as exc:
                run.error = str(exc)
        finally:
            _release(h, case)
            with contextlib.suppress(FileNotFoundError):
                (h.armed(DST) / "prepare3.qemu_argv").unlink()
    try:
        outcome: Outcome | str = wait_for(lambda: _outcome(h, run), 30, "the case to settle")
    except TimeoutError:
        outcome = f"unsettled: QEMUs {qemu_pids_of(run.uuid)}"
    return run, outcome


def _hold(h: V2Hosts, case: V2Case, job: Any) -> None:
    if case.point is None:  # copying: QEMU has sent data and goes on at 1 MiB/s
        wait_for(lambda: (job.info().get("data_processed") or 0) > 0, 60, "the copy to run")
        return
    side, point = case.point
    wait_for((h.armed(_host(side)) / f"{point}.hit").exists, 60, f"{point} to be reached")


def _cleanup(h: V2Hosts, run: Run) -> None:
    for host in (SRC, DST):
        for task in ("destroy", "undefine"):
            with contextlib.suppress(FerryError):
                h.client.call(host, task, domain=run.name, timeout=30)
    wait_for(lambda: not qemu_pids_of(run.uuid), 20, "the case's QEMUs to go")


@pytest.mark.parametrize("case", v2_cases(), ids=lambda c: c.id)
def test_a_v2_fault_leaves_at_most_one_copy_and_the_error_says_where_the_guest_is(
        v2: V2Hosts, base_image: Path, case: V2Case) -> None:
    run, outcome = _run(v2, base_image, case)
    try:
        wait_for(lambda: not v2.client.redis.exists(f"ferry:job:{run.uuid}"), 10,
                 "the job record to end")
        assert outcome == case.expected, \
            f"{case.id}: expected {case.expected.value}, got {outcome} (error: {run.error}, " \
            f"signal reply: {run.reply})"
        if case.expected == Outcome.D:
            assert run.error is None and run.summary["result"] == "completed"
        else:
            pattern = V2_ERRORS[case.fault]
            assert run.error is not None and pattern is not None
            assert re.search(pattern, run.error, re.I), f"the error says: {run.error}"
        if case.expected == Outcome.LOST and case.at == At.FINISH:
            assert re.search(r"guest is lost|source .*gone", run.error or "", re.I), \
                f"a lost guest must be said so: {run.error}"
        if case.fault == V2Fault.ABORT and case.at == At.FINISH:
            assert "refused" in (run.reply or {}), f"a late abort was not refused: {run.reply}"
        if case.expected == Outcome.S:
            info = v2.client.call(SRC, "dominfo", domain=run.name)
            assert (info["state"], info["pid"]) == ("running", run.src_pid)
            assert all(d["name"] != run.name for d in v2.client.call(DST, "list", all=True))
    finally:
        _cleanup(v2, run)
