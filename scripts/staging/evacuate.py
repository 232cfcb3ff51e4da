"""Evacuate a host: live-migrate every active guest off it, at most N at a time.

    python -m scripts.staging.evacuate alpha --to beta,gamma --parallel 2 [--json]

Each guest goes to the target with the fewest guests at the time of
planning (its own guests plus those already planned for it), ties in the
order given.  Running and paused guests both move (a paused one stays
paused on its target).  A failed guest does not stop the others: it stays
on the source, and the report names its error.  Exit status 0 only when
every guest moved.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from scripts.staging.common import (
    MOVE_HEADERS,
    Move,
    add_migration_options,
    client_from_env,
    emit_json,
    fail,
    migrate_window,
    migration_options,
    move_rows,
    table,
)
from tasks.client import Client
from workers.errors import FerryError


def plan(client: Client, source: str, targets: Sequence[str]) -> list[Move]:
    """One move per active guest of `source`, spread over `targets` by their load."""
    if not targets:
        raise ValueError("no target hosts")
    if source in targets:
        raise ValueError(f"the source host '{source}' cannot be a target")
    load = {t: len(client.call(t, "list")) for t in targets}
    moves = []
    for name in sorted(d["name"] for d in client.call(source, "list")):
        dest = min(targets, key=lambda t: load[t])  # min keeps the first of equals
        load[dest] += 1
        moves.append(Move(name, source, dest))
    return moves


def evacuate(client: Client, source: str, targets: Sequence[str], options: dict[str, Any],
             parallel: int = 1, wait: float = 600) -> list[Move]:
    """Move every active guest off `source`; one record per guest."""
    def progress(m: Move) -> None:
        print(f"{m.domain}: {m.source} -> {m.dest} {'ok' if m.ok else 'failed'} "
              f"in {m.seconds:.2f}s{'' if m.ok else f' ({m.error})'}", file=sys.stderr)

    return migrate_window(client, plan(client, source, targets), options, parallel, wait,
                          on_done=progress)


def report(source: str, moves: list[Move]) -> dict[str, Any]:
    return {"source": source, "moves": [m.to_json() for m in moves],
            "ok": sum(m.ok for m in moves), "failed": sum(not m.ok for m in moves)}


def hosts_arg(text: str) -> list[str]:
    names = [h.strip() for h in text.split(",") if h.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected host names, comma separated")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.staging.evacuate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The broker is FERRY_BROKER_URL.")
    p.add_argument("source", help="the host to empty")
    p.add_argument("--to", required=True, type=hosts_arg, metavar="HOST[,HOST...]",
                   help="target hosts")
    p.add_argument("--parallel", "-n", type=int, default=1, metavar="N",
                   help="at most N migrations at a time (default: 1)")
    add_migration_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.parallel < 1:
        return fail("--parallel must be at least 1")
    try:
        client = client_from_env()
        moves = evacuate(client, args.source, args.to, migration_options(args),
                         args.parallel, args.wait)
    except (FerryError, ValueError) as exc:
        return fail(str(exc))
    rep = report(args.source, moves)
    if args.json:
        emit_json(rep)
    else:
        print(table(MOVE_HEADERS, move_rows(moves)) if moves else
              f"no active guests on {args.source}")
        print(f"{rep['ok']} moved, {rep['failed']} failed")
    return 0 if rep["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
