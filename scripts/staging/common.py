"""What the staging scripts share: one migration's record, a bounded window of them, output.

A migration is `Client.migrate`: the managed v3 chain (begin3 | prepare3 |
perform3 | finish3 | confirm3, each signature on its host's queue), started
at once; the window keeps at most N of those chains in flight, and starts
the next one as soon as any ends, so one slow guest does not hold the
others back, and one failed guest does not stop the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from config.settings import load
from tasks.client import Client
from workers.errors import FerryError

POLL_S = 0.05  # how often the window looks at the chains in flight


@dataclass
class Move:
    """One migration and how it went."""

    domain: str
    source: str
    dest: str
    ok: bool = False
    seconds: float = 0.0
    downtime_ms: float | None = None
    job_id: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def client_from_env() -> Client:
    """A client on the broker named by FERRY_BROKER_URL (ferry's default if unset)."""
    return Client(load())


def add_migration_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("migration options (as `ferry migrate`)")
    g.add_argument("--bandwidth", type=int, metavar="MIB_S",
                   help="bandwidth limit per migration in MiB/s (default: unlimited)")
    g.add_argument("--timeout", type=int, metavar="S",
                   help="pause a guest that has not converged after S seconds")
    g.add_argument("--auto-converge", action="store_true", help="throttle busy guests' CPUs")
    g.add_argument("--persistent", action="store_true", help="define the guest on the dest")
    g.add_argument("--undefinesource", action="store_true",
                   help="undefine the guest on the source")
    g.add_argument("--wait", type=float, default=600, metavar="S",
                   help="give up waiting for one migration after S seconds (default: 600)")
    parser.add_argument("--json", action="store_true", help="machine output")


def migration_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"live": True, "auto_converge": args.auto_converge,
                            "persistent": args.persistent,
                            "undefinesource": args.undefinesource}
    if args.bandwidth is not None:
        opts["bandwidth_mib_s"] = args.bandwidth
    if args.timeout is not None:
        opts["timeout_s"] = args.timeout
    return opts


def _finish(move: Move, job: Any, started: float, wait: float) -> Move:
    try:
        summary = job.wait(timeout=wait)
        move.ok = summary.get("result") == "completed"
        move.downtime_ms = (summary.get("statistics") or {}).get("downtime")
        move.error = summary.get("error")
    except FerryError as exc:
        move.error = str(exc)
    move.seconds = round(time.monotonic() - started, 3)
    return move


def _start(client: Client, move: Move, options: dict[str, Any]) -> tuple[Any, float]:
    """The job of `move` (None if it could not start: the record says why) and its start."""
    started = time.monotonic()
    try:
        job = client.migrate(move.domain, move.source, move.dest, **options)
    except FerryError as exc:
        move.error, move.seconds = str(exc), round(time.monotonic() - started, 3)
        return None, started
    move.job_id = job.id
    return job, started


def migrate_one(client: Client, move: Move, options: dict[str, Any], wait: float) -> Move:
    """Run one migration to its end; the record says how it went (never raises FerryError)."""
    job, started = _start(client, move, options)
    return move if job is None else _finish(move, job, started, wait)


def migrate_window(client: Client, moves: Iterable[Move], options: dict[str, Any],
                   parallel: int, wait: float,
                   on_done: Callable[[Move], None] | None = None) -> list[Move]:
    """Run `moves` with at most `parallel` in flight; their records, in the order given.

    A migration still running after `wait` seconds is aborted (the source keeps its guest)
    and recorded as failed.
    """
    todo = deque(moves)
    ordered = list(todo)
    running: list[tuple[Move, Any, float]] = []
    while todo or running:
        while todo and len(running) < parallel:
            move = todo.popleft()
            job, started = _start(client, move, options)
            if job is not None:
                running.append((move, job, started))
            elif on_done:
                on_done(move)
        still = []
        for move, job, started in running:
            if job.done():
                _finish(move, job, started, wait)
            elif time.monotonic() - started > wait:
                with contextlib.suppress(FerryError):
                    job.abort()
                _finish(move, job, started, 0.1)
            else:
                still.append((move, job, started))
                continue
            if on_done:
                on_done(move)
        running = still
        if running:
            time.sleep(POLL_S)  # polling the result backend, not synchronisation
    return ordered


def active_guests(client: Client, host: str) -> list[str]:
    """Names of the guests with a QEMU process on `host` (running or paused)."""
    return [d["name"] for d in client.call(host, "list")]


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain text table (no wrapping, so error messages stay whole)."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in r]
                                           for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def move_rows(moves: Iterable[Move]) -> list[list[Any]]:
    return [[m.domain, m.source, m.dest, "ok" if m.ok else "failed", f"{m.seconds:.2f}",
             m.downtime_ms, m.error] for m in moves]


MOVE_HEADERS = ("guest", "from", "to", "result", "seconds", "downtime ms", "error")


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def fail(message: str) -> int:
    """The one-line error of every ferry command; exit status 1."""
    print(f"error: {message}", file=sys.stderr)
    return 1
