"""Rolling maintenance: empty each host in turn onto the others, run a hook, move on.

    python -m scripts.staging.rolling alpha beta gamma --parallel 2 -- ./upgrade.sh {host}

For each host in the order given: evacuate it (every active guest to the
other hosts of the list, the least loaded first), then run the hook, if one
follows `--`, as an argument list (never through a shell) with `{host}`
replaced by the host's name and FERRY_MAINTENANCE_HOST in its environment,
then wait for the host to be alive again (a hook may restart its worker)
and go on with the next host.  The run stops at the first host that could
not be emptied or whose hook failed: that host is not handed to the hook
with guests still on it.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from scripts.staging.common import (
    MOVE_HEADERS,
    Move,
    add_migration_options,
    client_from_env,
    emit_json,
    fail,
    migration_options,
    move_rows,
    table,
)
from scripts.staging.evacuate import evacuate
from scripts.testbed.stack import wait_for
from tasks.client import Client
from workers.errors import FerryError


@dataclass
class Step:
    """One host's turn."""

    host: str
    moves: list[Move] = field(default_factory=list)
    hook_rc: int | None = None
    hook_seconds: float | None = None
    hook_output: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(m.ok for m in self.moves)

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "ok": self.ok, "moves": [m.to_json() for m in self.moves],
                "hook": None if self.hook_rc is None else {
                    "rc": self.hook_rc, "seconds": self.hook_seconds,
                    "output": self.hook_output},
                "error": self.error}


def run_hook(step: Step, hook: Sequence[str], timeout: float) -> None:
    argv = [a.replace("{host}", step.host) for a in hook]
    env = {**os.environ, "FERRY_MAINTENANCE_HOST": step.host}
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
        step.hook_rc, step.hook_output = proc.returncode, (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0:
            step.error = f"hook {argv[0]} exited with status {proc.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        step.hook_rc, step.error = -1, f"hook {argv[0]} failed: {exc}"
    step.hook_seconds = round(time.monotonic() - started, 3)
    if step.hook_output:
        print(step.hook_output, file=sys.stderr)


def _alive(client: Client, host: str) -> bool:
    try:
        client.host(host)
    except FerryError:
        return False
    return True


def rolling(client: Client, hosts: Sequence[str], hook: Sequence[str],
            options: dict[str, Any], parallel: int, wait: float,
            hook_timeout: float, alive_timeout: float) -> list[Step]:
    """Every host's turn, in order, up to and including the first that failed."""
    steps = []
    for host in hosts:
        step = Step(host)
        steps.append(step)
        print(f"== {host}: evacuating", file=sys.stderr)
        try:
            step.moves = evacuate(client, host, [h for h in hosts if h != host], options,
                                  parallel, wait)
        except FerryError as exc:
            step.error = str(exc)
        if not step.ok:
            step.error = step.error or f"{sum(not m.ok for m in step.moves)} guest(s) " \
                                       f"could not leave {host}"
            break
        if hook:
            print(f"== {host}: running the hook", file=sys.stderr)
            run_hook(step, hook, hook_timeout)
            if step.error is None:
                try:
                    wait_for(functools.partial(_alive, client, host), alive_timeout,
                             f"host {host} to be alive after its hook", interval=0.2)
                except TimeoutError as exc:
                    step.error = str(exc)
        if step.error:
            break
    return steps


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.staging.rolling",
        usage="%(prog)s HOST HOST [HOST ...] [options] [-- HOOK [ARG ...]]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="After `--`: the hook and its arguments ({host} is the host's name). "
               "The broker is FERRY_BROKER_URL.")
    p.add_argument("hosts", nargs="+", help="the hosts, in maintenance order (two or more)")
    p.add_argument("--parallel", "-n", type=int, default=1, metavar="N",
                   help="at most N migrations at a time per host (default: 1)")
    p.add_argument("--hook-timeout", type=float, default=600, metavar="S",
                   help="stop the run when the hook takes longer (default: 600)")
    p.add_argument("--alive-timeout", type=float, default=120, metavar="S",
                   help="how long a host may take to be alive after its hook (default: 120)")
    add_migration_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    hook = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if len(set(args.hosts)) != len(args.hosts) or len(args.hosts) < 2:
        return fail("give two or more different hosts")
    if args.parallel < 1:
        return fail("--parallel must be at least 1")
    if "--" in argv and not hook:
        return fail("no hook after `--`")
    try:
        steps = rolling(client_from_env(), args.hosts, hook, migration_options(args),
                        args.parallel, args.wait, args.hook_timeout, args.alive_timeout)
    except FerryError as exc:
        return fail(str(exc))
    ok = all(s.ok for s in steps) and len(steps) == len(args.hosts)
    if args.json:
        emit_json({"hosts": [s.to_json() for s in steps], "ok": ok})
    else:
        for s in steps:
            hook_text = "" if s.hook_rc is None else \
                f", hook exited {s.hook_rc} in {s.hook_seconds:.2f}s"
            print(f"{s.host}: {sum(m.ok for m in s.moves)} of {len(s.moves)} guest(s) "
                  f"moved off{hook_text}"
                  f"{f' -- stopped: {s.error}' if s.error else ''}")
        moves = [m for s in steps for m in s.moves]
        if moves:
            print(table(MOVE_HEADERS, move_rows(moves)))
        print("rolling maintenance done" if ok else "rolling maintenance stopped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
