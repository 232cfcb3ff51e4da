"""Celery's Sentinel form of the broker URL, read and checked.

    sentinel://[:PASSWORD@]HOST[:PORT][/DB];sentinel://...

One `sentinel://` part per Sentinel process, joined by `;` (Celery's and kombu's
form).  As in Celery, the password in the URL is the master's (Redis's
`requirepass`); a password of the sentinels themselves is FERRY_SENTINEL_PASSWORD,
and the name of the monitored master is FERRY_SENTINEL_MASTER.  A part without a
port means Sentinel's port 26379; every part names the same database and password
(or leaves them to the first part).

Pure parsing: no connection is made here (config/broker.py makes them).
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import unquote, urlsplit

SCHEME = "sentinel"
DEFAULT_PORT = 26379
SEPARATOR = ";"


class SentinelUrl(NamedTuple):  # not a dataclass: every `ferry` command parses its settings
    """The sentinels to ask, and the database and credentials of the master."""

    nodes: tuple[tuple[str, int], ...]
    db: int = 0
    password: str | None = None  # the master's
    username: str | None = None  # the master's (Redis ACL user)

    def describe(self) -> str:
        """The sentinels as text, never the password (for logs and errors)."""
        return ", ".join(f"{host}:{port}" for host, port in self.nodes)


def is_sentinel(url: str) -> bool:
    """Whether `url` is in Celery's Sentinel form (its first part is sentinel://)."""
    return url.strip().lower().startswith(f"{SCHEME}://")


def parse(url: str) -> SentinelUrl:
    """The sentinels of a `sentinel://...;sentinel://...` URL; ValueError with one line
    saying what is wrong (the password never appears in it)."""
    parts = [part.strip() for part in url.split(SEPARATOR)]
    if not any(parts):
        raise ValueError("empty Sentinel URL")
    nodes: list[tuple[str, int]] = []
    dbs: set[int] = set()
    passwords: set[str] = set()
    users: set[str] = set()
    for index, part in enumerate(parts, 1):
        where = f"part {index} of the Sentinel URL"
        if not part:
            raise ValueError(f"{where} is empty (a stray ';'?)")
        split = urlsplit(part)
        if split.scheme.lower() != SCHEME:
            shown = split.scheme or part.split(":", 1)[0]
            raise ValueError(f"{where} is not sentinel:// (got {shown!r}); every part of "
                             "a Sentinel URL is sentinel://[:PASSWORD@]HOST:PORT[/DB]")
        if split.query or split.fragment:
            raise ValueError(f"{where} has a query or fragment; the form is "
                             "sentinel://[:PASSWORD@]HOST:PORT[/DB]")
        host = split.hostname
        if not host:
            raise ValueError(f"{where} names no host")
        try:
            port = split.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{where} has a bad port (1-65535)") from None
        path = split.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"{where} has database {path!r}, not a number")
            dbs.add(int(path))
        if split.password:
            passwords.add(unquote(split.password))
        if split.username:
            users.add(unquote(split.username))
        nodes.append((host, port))
    if len(dbs) > 1:
        raise ValueError(f"the parts of the Sentinel URL name different databases "
                         f"({', '.join(str(d) for d in sorted(dbs))})")
    if len(passwords) > 1 or len(users) > 1:
        raise ValueError("the parts of the Sentinel URL carry different credentials")
    if len(set(nodes)) != len(nodes):
        raise ValueError("the Sentinel URL names a sentinel twice")
    return SentinelUrl(nodes=tuple(nodes), db=dbs.pop() if dbs else 0,
                       password=passwords.pop() if passwords else None,
                       username=users.pop() if users else None)


def check_broker_url(url: str) -> str:
    """FERRY_BROKER_URL as given, once it is known to be redis://, rediss://, unix:// or
    a Sentinel URL that parses; ValueError (one line) otherwise."""
    text = url.strip()
    if is_sentinel(text):
        parse(text)
        return text
    if SEPARATOR in text and f"{SCHEME}://" in text.lower():
        raise ValueError("a Sentinel URL must start with sentinel:// and have only "
                         "sentinel:// parts")
    scheme = urlsplit(text).scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"scheme {scheme or 'none'!r} is not one of redis://, rediss://, "
                         "unix:// or sentinel://HOST:PORT;sentinel://...")
    return text
