"""Soak: live-migrate one guest back and forth between two hosts, N migrations in all.

    python -m scripts.staging.soak web1 alpha beta --count 100 [--json]

The guest starts from whichever of the two hosts runs it.  Migrations run
one after the other; the run stops at the first failure (the guest stays
where that migration left it, normally on its source).  The report gives
the latency of the migrations (from the request to the summary) as p50,
p90, p99 and max, their downtime, and the failure.  Exit status 0 only
when all N migrations succeeded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from scripts.staging.common import (
    Move,
    add_migration_options,
    client_from_env,
    emit_json,
    fail,
    migrate_one,
    migration_options,
    percentile,
    table,
)
from tasks.client import Client
from workers.errors import FerryError, NotFoundError


def where(client: Client, domain: str, hosts: Sequence[str]) -> str:
    """The one of `hosts` where `domain` is active."""
    for host in hosts:
        try:
            info = client.call(host, "dominfo", domain=domain)
        except NotFoundError:
            continue
        if info["state"] in ("running", "paused"):
            return host
    raise NotFoundError(f"guest '{domain}' is not active on {' or '.join(hosts)}")


def soak(client: Client, domain: str, a: str, b: str, count: int,
         options: dict[str, Any], wait: float) -> list[Move]:
    """Up to `count` migrations, alternating direction; stops after the first failure."""
    src = where(client, domain, (a, b))
    dst = b if src == a else a
    moves = []
    for i in range(count):
        move = migrate_one(client, Move(domain, src, dst), options, wait)
        moves.append(move)
        print(f"{i + 1}/{count} {src} -> {dst}: "
              f"{'ok' if move.ok else 'failed'} in {move.seconds:.2f}s", file=sys.stderr)
        if not move.ok:
            break
        src, dst = dst, src
    return moves


def report(domain: str, count: int, moves: list[Move]) -> dict[str, Any]:
    ok = [m for m in moves if m.ok]
    latency = [m.seconds * 1000 for m in ok]
    downtime = [float(m.downtime_ms) for m in ok if m.downtime_ms is not None]
    failed = [m for m in moves if not m.ok]

    def pcts(values: list[float]) -> dict[str, float | None]:
        return {"p50": percentile(values, 50), "p90": percentile(values, 90),
                "p99": percentile(values, 99), "max": max(values) if values else None}

    return {"domain": domain, "requested": count, "done": len(moves), "ok": len(ok),
            "failures": len(failed), "completed": len(ok) == count,
            "latency_ms": pcts(latency), "downtime_ms": pcts(downtime),
            "failure": failed[0].to_json() if failed else None,
            "moves": [m.to_json() for m in moves]}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def render(rep: dict[str, Any]) -> str:
    rows = [[name, *(_ms(rep[key][p]) for p in ("p50", "p90", "p99", "max"))]
            for name, key in (("latency ms", "latency_ms"), ("downtime ms", "downtime_ms"))]
    lines = [f"{rep['domain']}: {rep['ok']} of {rep['requested']} migrations ok, "
             f"{rep['failures']} failed",
             table(("", "p50", "p90", "p99", "max"), rows)]
    if rep["failure"]:
        f = rep["failure"]
        lines.append(f"stopped at migration {rep['done']} ({f['source']} -> {f['dest']}): "
                     f"{f['error']}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.staging.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The broker is FERRY_BROKER_URL.")
    p.add_argument("domain", help="the guest (active on one of the two hosts)")
    p.add_argument("host_a")
    p.add_argument("host_b")
    p.add_argument("--count", "-c", type=int, default=10, metavar="N",
                   help="how many migrations in all (default: 10)")
    add_migration_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.count < 1:
        return fail("--count must be at least 1")
    if args.host_a == args.host_b:
        return fail("the two hosts must differ")
    try:
        moves = soak(client_from_env(), args.domain, args.host_a, args.host_b, args.count,
                     migration_options(args), args.wait)
    except FerryError as exc:
        return fail(str(exc))
    rep = report(args.domain, args.count, moves)
    if args.json:
        emit_json(rep)
    else:
        print(render(rep))
    return 0 if rep["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
