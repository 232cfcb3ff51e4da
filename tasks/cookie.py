"""The migration cookie codec under the name services already use (`tasks.cookie.parse`,
`Cookie.to_xml`): it lives in workers/migration/cookie.py, beside the phases that use it;
`statistics_from_query_migrate` lives beside the QMP code, in workers/migration/qemu_migrate.py.
"""

from __future__ import annotations

from workers.migration.cookie import (
    LIBVIRT_FEATURES,
    MAX_COOKIE_BYTES,
    SUPPORTED_FEATURES,
    Cookie,
    CookieGraphics,
    CookieLockstate,
    CookieNbd,
    CookieNbdDisk,
    CookieStatistics,
    make_cookie,
    parse,
)
from workers.migration.qemu_migrate import statistics_from_query_migrate

__all__ = [
    "LIBVIRT_FEATURES",
    "MAX_COOKIE_BYTES",
    "SUPPORTED_FEATURES",
    "Cookie",
    "CookieGraphics",
    "CookieLockstate",
    "CookieNbd",
    "CookieNbdDisk",
    "CookieStatistics",
    "make_cookie",
    "parse",
    "statistics_from_query_migrate",
]
