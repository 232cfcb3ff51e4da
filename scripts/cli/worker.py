"""`ferry worker`: one host = the host agent + a Celery worker on queue host.NAME.

The worker uses Celery's thread pool so every task runs in the process that
owns the QMP monitors; the agent starts (and reconnects to surviving
guests) before the first task is consumed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from config.celery_app import configure, queue_for, reuse_publish_clients, survive_broker_restarts
from config.settings import Settings, load
from tasks.recovery import resume_interrupted
from workers import failpoints
from workers.agent import set_agent
from workers.host import Host

log = logging.getLogger("ferry.worker")


def setup_logging(settings: Settings) -> None:
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s [{settings.host}] %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(settings.log_level.upper())
    for handler in (logging.StreamHandler(sys.stderr),
                    logging.FileHandler(settings.state_dir / "worker.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    # qemu.qmp's own debug output repeats ours; keep it to warnings.
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)


def run_worker(args: argparse.Namespace) -> int:
    settings = load(host=args.host, host_uuid=args.uuid, state_dir=args.state_dir,
                    migration_address=args.migration_address, log_level=args.loglevel)
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    setup_logging(settings)
    app = configure(settings)
    survive_broker_restarts(settings)
    reuse_publish_clients()
    failpoints.configure(settings.failpoints, settings.failpoint_dir)
    host = Host(settings)
    host.start()
    set_agent(host.agent)
    resume_interrupted(host.agent)
    try:
        app.worker_main([
            "worker", "--pool=threads", f"--concurrency={settings.worker_concurrency}",
            f"--queues={queue_for(settings.host)}", f"--hostname=ferry@{settings.host}",
            "--without-gossip", "--without-mingle", "--task-events",
            f"--loglevel={settings.log_level.upper()}",
        ])
    finally:
        set_agent(None)
        host.stop()
        log.info("host %s stopped; its guests keep running", settings.host)
    return 0
