"""What other services import: call a host's tasks, list hosts, start migrations.

Every call checks the host's heartbeat first, so a host that does not exist
or has died is a clear error at once, and waits a bounded time for the
answer, so a host that stops answering is a clear error, never a hang.
The calls themselves are tasks/connection.py's; managed migrations and
their handles are tasks/migrate_client.py's.
"""

from __future__ import annotations

from typing import Any

from tasks import migrate_client
from tasks.connection import Connection
from tasks.migrate_client import MigrationJob


class Client(Connection):
    def migrate(self, domain: str, source: str, dest: str, **options: Any) -> MigrationJob:
        """Start a managed migration; returns a MigrationJob at once (see migrate_client)."""
        return migrate_client.migrate(self, domain, source, dest, **options)

    def migrate_dry_run(self, domain: str, source: str, dest: str,
                        **options: Any) -> dict[str, Any]:
        """Begin's and Prepare's checks, nothing started: what a storage copy would copy."""
        return migrate_client.dry_run(self, domain, source, dest, **options)


def migrate(domain: str, source: str, dest: str, **options: Any) -> MigrationJob:
    """What services call: `tasks.client.migrate("web1", "alpha", "beta", live=True)`."""
    return Client().migrate(domain, source, dest, **options)
