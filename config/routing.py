"""Queue routing: the queue of each host.  Apart from config/celery_app.py (which
re-exports it) so that a client sending tasks without Celery does not import it."""

from __future__ import annotations


def queue_for(host: str) -> str:
    """The queue of host `host`: only that host's worker consumes it."""
    return f"host.{host}"
