"""A small Redis client of the standard library alone, for the `ferry` command.

redis-py costs ~140 ms of CPU to import (it pulls in asyncio); a command that
sends one task and reads one result needs a socket and RESP2, ~200 lines.
Its connections follow config/broker.py's rules exactly: a `rediss://` URL is
verified TLS (CERT_REQUIRED, the host name checked) against FERRY_REDIS_CA or
the system's CAs, with FERRY_REDIS_CERT / FERRY_REDIS_KEY as the client's
certificate, as redis-py builds its SSL context; the URL's user, password and
database are sent as AUTH and SELECT.  `endpoint` says None for a URL whose
meaning this client does not reproduce exactly (Sentinel, unix://, options in
the query): its callers use redis-py there.

Error texts are redis-py's (the CLI shows them after "cannot reach the broker").
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from config.settings import Settings

CONNECT_TIMEOUT_S = 10.0
READ_SIZE = 65536
# Error replies whose first word redis-py drops from the message (its EXCEPTION_CLASSES)
_ERROR_CODES = frozenset({"ERR", "OOM", "WRONGPASS", "EXECABORT", "LOADING", "NOSCRIPT",
                          "READONLY", "NOAUTH", "NOPERM", "ASK", "TRYAGAIN", "MOVED",
                          "CLUSTERDOWN", "CROSSSLOT", "MASTERDOWN"})


class ReplyError(Exception):
    """An error reply of the server, worded as redis-py words it."""


class Endpoint(NamedTuple):  # not a dataclass: `dataclasses` costs an import
    """Where and how to connect: one Redis server of a redis:// or rediss:// URL."""

    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def where(self) -> str:
        return f"{self.host}:{self.port}"


def endpoint(settings: Settings) -> Endpoint | None:
    """The server of the settings' broker URL, or None when it is not a plain
    redis:// or rediss:// URL (a Sentinel URL, unix://, a query string)."""
    try:
        url = urlsplit(settings.broker_url.strip())
        port = url.port or 6379
    except ValueError:
        return None
    path = url.path.strip("/")
    if url.scheme not in ("redis", "rediss") or url.query or url.fragment \
            or not url.hostname or not (path == "" or path.isdigit()) \
            or (url.username and url.password is None):
        return None
    tls = url.scheme == "rediss"
    return Endpoint(
        host=unquote(url.hostname), port=port, db=int(path or 0),
        username=unquote(url.username) if url.username else None,
        password=unquote(url.password) if url.password is not None else None,
        tls=tls, ca=_path(settings.redis_ca) if tls else None,
        cert=_path(settings.redis_cert) if tls else None,
        key=_path(settings.redis_key) if tls else None)


def _path(value: object) -> str | None:
    return None if value is None else str(value)


def pack(*args: str | bytes | int | float) -> bytes:
    """One command in RESP."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


def _reply_error(text: str) -> ReplyError:
    code = text.split(" ")[0]
    return ReplyError(text[len(code) + 1:] if code in _ERROR_CODES else text)


class Connection:
    """One connection: commands and their replies in order (pipelined when sent
    together); an error reply is returned as a ReplyError, not raised, by `read`."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self.sock = sock
        self.where = where
        self.buf = bytearray()
        self.prelude: list[bytes] = []  # sent ahead of the first `call` (`greeting`)

    @classmethod
    def open(cls, ep: Endpoint, timeout: float = CONNECT_TIMEOUT_S) -> Connection:
        """Connected (and TLS shaken hands); the first `call` carries AUTH and SELECT
        (`greeting`) in the same round trip."""
        try:
            sock = _connect(ep, timeout)
        except TimeoutError:
            raise TimeoutError("Timeout connecting to server") from None
        except OSError as exc:
            raise ConnectionError(_connect_error(ep, exc)) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ep.tls:
                sock = _wrap_tls(sock, ep)
        except TimeoutError:
            sock.close()
            raise TimeoutError("Timeout connecting to server") from None
        except OSError as exc:
            sock.close()
            raise ConnectionError(_connect_error(ep, exc)) from None
        conn = cls(sock, ep.where())
        conn.prelude = greeting(ep)
        return conn

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, *commands: bytes) -> None:
        """Packed commands (`pack`), written at once."""
        try:
            self.sock.sendall(b"".join(commands))
        except TimeoutError:
            raise TimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            errno, text = ("UNKNOWN", exc.args[0]) if len(exc.args) == 1 else exc.args[:2]
            raise ConnectionError(f"Error {errno} while writing to socket. {text}.") from None

    def read(self, timeout: float | None = CONNECT_TIMEOUT_S) -> Any:
        """The next reply; TimeoutError after `timeout` seconds without one."""
        self.sock.settimeout(timeout)
        while True:
            parsed = _parse(self.buf, 0)
            if parsed is not None:
                value, end = parsed
                del self.buf[:end]
                return value
            try:
                data = self.sock.recv(READ_SIZE)
            except TimeoutError:
                raise TimeoutError("Timeout reading from socket") from None
            except OSError as exc:
                raise ConnectionError(f"Error while reading from {self.where} : {exc.args}") \
                    from None
            if not data:
                raise ConnectionError("Connection closed by server.")
            self.buf += data

    def call(self, *commands: bytes) -> list[Any]:
        """Send `commands` together; their replies, the first error reply raised."""
        return self.finish(self.start(*commands))

    def start(self, *commands: bytes) -> tuple[int, int]:
        """Send `commands` (after the greeting, the first time) without waiting: what
        `finish` needs to read their replies, meanwhile other connections can work."""
        prelude, self.prelude = self.prelude, []
        self.send(*prelude, *commands)
        return len(prelude), len(commands)

    def finish(self, sent: tuple[int, int]) -> list[Any]:
        """The replies of what `start` sent, the first error reply raised."""
        skipped, wanted = sent
        replies = [self.read() for _ in range(skipped + wanted)]
        for reply in replies:
            if isinstance(reply, ReplyError):
                raise reply
        return replies[skipped:]


def greeting(ep: Endpoint) -> list[bytes]:
    """AUTH and SELECT as the URL asks (sent ahead of the first commands)."""
    out = []
    if ep.password is not None:
        out.append(pack("AUTH", *([ep.username] if ep.username else []), ep.password))
    if ep.db:
        out.append(pack("SELECT", ep.db))
    return out


def _connect(ep: Endpoint, timeout: float) -> socket.socket:
    """socket.create_connection, an ASCII host name passed as bytes: a str one makes
    getaddrinfo load the idna codec (~1 ms of every command's start)."""
    host: str | bytes = ep.host.encode() if ep.host.isascii() else ep.host
    error: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, ep.port, 0,
                                                               socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError("getaddrinfo returns an empty list")


def _connect_error(ep: Endpoint, exc: OSError) -> str:
    """redis-py's words for a failed connection (redis.utils.format_error_message)."""
    if not exc.args:
        return f"Error connecting to {ep.where()}."
    if len(exc.args) == 1:
        return f"Error {exc.args[0]} connecting to {ep.where()}."
    return f"Error {exc.args[0]} connecting to {ep.where()}. {exc.args[1]}."


def _wrap_tls(sock: socket.socket, ep: Endpoint) -> socket.socket:
    """The context redis-py's SSLConnection builds for ferry's options (config/broker.py):
    the default context (system CAs), CERT_REQUIRED, host name checked, the client's
    certificate, then the given CA."""
    # start-up: ssl is loaded for rediss:// only
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if ep.cert or ep.key:
        context.load_cert_chain(certfile=ep.cert or "", keyfile=ep.key)
    if ep.ca is not None:
        context.load_verify_locations(cafile=ep.ca)
    return context.wrap_socket(sock, server_hostname=ep.host)


def _parse(buf: bytearray, pos: int) -> tuple[Any, int] | None:
    """One RESP2 reply from buf[pos:] and where it ends; None while incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, line = buf[pos:pos + 1], bytes(buf[pos + 1:end])
    after = end + 2
    if kind == b"+":
        return line.decode(), after
    if kind == b"-":
        return _reply_error(line.decode(errors="replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return None
        return bytes(buf[after:after + size]), after + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            parsed = _parse(buf, after)
            if parsed is None:
                return None
            item, after = parsed
            items.append(item)
        return items, after
    # hiredis's words (redis-py's parser here)
    raise ConnectionError(f'Protocol error, got "{kind.decode(errors="replace")}" as reply '
                          "type byte")
