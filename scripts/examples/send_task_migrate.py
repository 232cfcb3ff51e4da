"""A service that enqueues a ferry live migration with Celery only: it does not import ferry.

    FERRY_BROKER_URL=redis://127.0.0.1:6379/0 \\
        python scripts/examples/send_task_migrate.py web1 alpha beta [--bandwidth 500]

It builds the managed v3 chain by task names, each signature routed to the
queue of the host where that phase runs, sends it, waits for the end and
prints the summary as JSON (exit 0), or the error as JSON (exit 1).  The
contract it relies on is in README.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery, chain
from celery.exceptions import TimeoutError as CeleryTimeout

# libvirt's virDomainMigrateFlags, as ferry takes them
LIVE, PERSIST_DEST, UNDEFINE_SOURCE = 1, 8, 16


def make_app(broker_url: str) -> Celery:
    """A Celery app on ferry's broker (which is also its result backend), JSON only."""
    app = Celery("migration-service", broker=broker_url, backend=broker_url)
    app.conf.update(task_serializer="json", result_serializer="json",
                    accept_content=["json"], result_accept_content=["json"],
                    task_send_sent_event=True,  # Flower sees the chain as it is sent
                    broker_connection_retry_on_startup=True)
    return app


def migration_params(domain: str, source: str, dest: str, *, flags: int = LIVE,
                     bandwidth_mib_s: int = 0, max_downtime_ms: int | None = None,
                     timeout_s: int | None = None) -> dict[str, Any]:
    """The parameters every phase carries; the job id also names the tasks."""
    return {"domain": domain, "source": source, "dest": dest, "flags": flags, "protocol": 3,
            "job_id": str(uuid.uuid4()), "xmlin": None, "migrate_uri": None,
            "bandwidth_mib_s": bandwidth_mib_s, "max_downtime_ms": max_downtime_ms,
            "timeout_s": timeout_s}


def migration_chain(app: Celery, params: dict[str, Any]) -> Any:
    """begin3 | prepare3 | perform3 | finish3 | confirm3, each on its host's queue."""
    source, dest = f"host.{params['source']}", f"host.{params['dest']}"

    def phase(name: str, queue: str, *args: Any) -> Any:
        return app.signature(f"ferry.{name}", args=args, queue=queue,
                             task_id=f"{params['job_id']}.{name}")

    return chain(phase("begin3", source, params), phase("prepare3", dest),
                 phase("perform3", source), phase("finish3", dest), phase("confirm3", source))


def error_json(job_id: str, exc: BaseException) -> dict[str, Any]:
    """ferry's errors arrive with args (message, phase, host, cause); others as they are."""
    args = [*exc.args, None, None, None, None][:4] if exc.args else [str(exc), None, None, None]
    message, phase, host, cause = args
    return {"job_id": job_id, "result": "failed",
            "error": {"type": type(exc).__name__, "message": str(message), "phase": phase,
                      "host": host, "cause": cause}}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("domain")
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("--bandwidth", type=int, default=0, help="MiB/s (default: unlimited)")
    p.add_argument("--max-downtime", type=int, help="ms")
    p.add_argument("--timeout", type=int, help="pause the guest after S seconds")
    p.add_argument("--persistent", action="store_true")
    p.add_argument("--undefinesource", action="store_true")
    p.add_argument("--wait", type=float, default=300, help="seconds to wait for the end")
    args = p.parse_args(argv)
    flags = LIVE | (PERSIST_DEST if args.persistent else 0) | \
        (UNDEFINE_SOURCE if args.undefinesource else 0)
    params = migration_params(args.domain, args.source, args.dest, flags=flags,
                              bandwidth_mib_s=args.bandwidth,
                              max_downtime_ms=args.max_downtime, timeout_s=args.timeout)
    app = make_app(os.environ.get("FERRY_BROKER_URL", "redis://127.0.0.1:6379/0"))
    result = migration_chain(app, params).apply_async()
    print(f"job {params['job_id']}: {args.domain} {args.source} -> {args.dest}",
          file=sys.stderr)
    try:
        summary = result.get(timeout=args.wait)
    except CeleryTimeout:
        print(json.dumps(error_json(params["job_id"], TimeoutError(
            f"no end within {args.wait:.0f}s (are hosts {args.source} and {args.dest} up?)")),
            indent=2))
        return 1
    except Exception as exc:  # the chain's first error, rebuilt by Celery from JSON
        print(json.dumps(error_json(params["job_id"], exc), indent=2))
        return 1
    finally:
        result.forget()
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
