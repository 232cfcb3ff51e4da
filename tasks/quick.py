"""The `ferry` command's client: tasks, results, job signals and managed migrations
over config/resp.py, without importing Celery or redis-py (~0.3 s of start-up).

It makes the calls of tasks/connection.py's Connection and tasks/migrate_client.py
(what services use) with the same Redis traffic and the same errors: it checks
the host's heartbeat, subscribes to the result's channel, pushes the message
Celery would push (tasks/envelope.py) with the queue's bindings and the
`task-sent` event, reads the result as Celery's Redis backend stores it
(`celery-task-meta-<id>`, JSON), reading it again every SLICE_S, and deletes
it afterwards.  A failure is rebuilt as Celery rebuilds it.

`unusable` says when to use Celery's client instead: signed task messages, a
Sentinel or unix:// broker URL or one with options, or FERRY_CLI_FAST_PATH off.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from config import resp
from config.resp import Connection, pack
from config.routing import queue_for
from config.settings import Settings
from tasks import envelope
from workers.errors import FerryError, HostUnavailableError, InvalidInputError
from workers.host_records import host_key, list_hosts

if TYPE_CHECKING:
    from tasks.migrate_plan import Step
    from workers.migration.params import MigrationParams

SLICE_S = 2.0  # as tasks/results.py: the longest a result stored during a reconnect goes unseen
PARENT_CHECK_S = 1.0  # as Celery's drain interval: how often a chain's earlier tasks are read
READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
RAISED = frozenset({"FAILURE", "REVOKED"})
_FERRY_PACKAGES = ("config.", "workers.", "tasks.")


def unusable(settings: Settings) -> str | None:
    """Why the `ferry` command must use Celery's client with these settings, or None."""
    if not settings.cli_fast_path:
        return "FERRY_CLI_FAST_PATH is off"
    if settings.signing_key or settings.signing_cert or settings.signing_cert_store:
        return "task messages are signed (Celery's auth serializer)"
    if resp.endpoint(settings) is None:
        return "the broker URL is not a plain redis:// or rediss:// URL"
    return None


def meta_key(task_id: str) -> str:
    """Where Celery's Redis backend stores a result (and the channel it announces it on)."""
    return f"celery-task-meta-{task_id}"


class QuickClient:
    """Calls of a host's tasks, host records, job signals and managed migrations."""

    def __init__(self, settings: Settings) -> None:
        ep = resp.endpoint(settings)
        assert ep is not None, "check unusable() first"
        self.settings, self.ep = settings, ep
        self.sender = envelope.origin()
        self.reply_to = envelope.new_id()  # Celery's per-thread oid: one per client here
        self._idle: list[Connection] = []
        self._lock = _thread.allocate_lock()  # `threading` costs an import
        self._clock = 0

    # -- connections ----------------------------------------------------------------------
    def _open(self) -> Connection:
        return Connection.open(self.ep)

    def _run(self, *commands: bytes) -> list[Any]:
        """Commands on an idle connection (a new one if none), their replies."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        conn = conn or self._open()
        try:
            replies = conn.call(*commands)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._idle.append(conn)
        return replies

    def _broker_error(self, exc: Exception) -> HostUnavailableError:
        return HostUnavailableError(f"cannot reach the broker at {self.settings.broker_url}",
                                    cause=str(exc))

    # -- what tasks/connection.py's Connection offers ------------------------------------
    def host(self, name: str) -> dict[str, Any]:
        """The live record of host `name`, or a clear error."""
        return self._hosts(name)[0]

    def _hosts(self, *names: str) -> list[dict[str, Any]]:
        """The live records of `names`, read in one round trip; the first missing one is
        the error."""
        try:
            raw = self._run(*(pack("GET", host_key(name)) for name in names))
        except (OSError, resp.ReplyError) as exc:
            raise self._broker_error(exc) from exc
        for name, rec in zip(names, raw, strict=True):
            if rec is None:
                raise HostUnavailableError(f"host '{name}' is not alive (no heartbeat in "
                                           "Redis)")
        return [dict(json.loads(rec)) for rec in raw]

    def hosts(self) -> list[dict[str, Any]]:
        try:
            return list_hosts(_Reader(self))
        except (OSError, resp.ReplyError) as exc:
            raise self._broker_error(exc) from exc

    def uuid_of(self, host: str, domain: str) -> str:
        return str(self.call(host, "dominfo", domain=domain)["uuid"])

    def call(self, host: str, task: str, timeout: float | None = None, **kwargs: Any) -> Any:
        """Run `ferry.<task>` on `host` and return its result (or raise its error)."""
        task_id = envelope.new_id()
        try:
            waiter = _Waiter(self, task_id)  # subscribing while the heartbeat is read
        except (OSError, resp.ReplyError) as exc:
            raise self._broker_error(exc) from exc
        try:
            self.host(host)
            waiter.subscribed()
        except (OSError, resp.ReplyError) as exc:
            waiter.close()
            raise self._broker_error(exc) from exc
        except BaseException:
            waiter.close()
            raise
        wait = timeout or self.settings.task_timeout_s
        try:
            try:
                self._send(f"ferry.{task}", task_id, queue_for(host), (), kwargs)
            except (OSError, resp.ReplyError) as exc:
                raise self._broker_error(exc) from exc
            try:
                meta = waiter.wait(wait)
            except TimeoutError:
                raise HostUnavailableError(f"host '{host}' did not answer {task} within "
                                           f"{wait:.0f}s", host=host) from None
            return outcome(meta, host)
        finally:
            waiter.close()
            self._forget(task_id)

    def signal(self, host: str, domain: str, op: str, **args: Any) -> Any:
        """Send job signal `op` for `domain` (known to `host`); the owner's answer."""
        # start-up: what only the signal commands need
        from workers.jobsignals.protocol import OPS

        if op not in OPS:
            raise InvalidInputError(f"unknown job signal '{op}' (one of {', '.join(OPS)})")
        uuid = self.uuid_of(host, domain)
        timeout = self.settings.signal_timeout_ms / 1000
        try:
            return _signal(self, uuid, op, args, timeout)
        except _NoOwner:
            # Nobody listened, so nothing happened: Celery's client does the rest (an
            # abort recorded for the next phase, or the error), in its own words.
            from tasks.client import Client  # start-up: only where no job runs

            return Client(self.settings).signal(host, domain, op, **args)

    def migrate(self, domain: str, source: str, dest: str, **options: Any) -> QuickJob:
        """Start a managed migration, as tasks/migrate_client.migrate; a handle at once."""
        # start-up: as below
        from tasks.migrate_plan import chain_steps, check_hosts, params_from_options
        from workers.migration.params import MigrationFlags as F  # start-up: migrate only

        p = params_from_options(domain, source, dest, **options)
        src, dst = self._hosts(source, dest)
        check_hosts(src, dst, source, dest)
        xml = None
        if p.protocol == 2 and not p.has(F.PEER2PEER):  # v2 has no Begin: the caller
            # fetches the XML, as libvirt's client does
            xml = self.call(source, "dumpxml", domain=domain, migratable=True)
        steps = chain_steps(p, xml)
        first, queue, args = steps[0]
        try:
            self._send(first.task_name, first.task_id(p.job_id), queue, args, {},
                       chain=later_steps(p, steps, self.reply_to))
        except (OSError, resp.ReplyError) as exc:
            raise self._broker_error(exc) from exc
        ids = [task.task_id(p.job_id) for task, _, _ in steps]
        return QuickJob(self, p, ids[-1], ids[-2::-1])

    def migrate_dry_run(self, domain: str, source: str, dest: str,
                        **options: Any) -> dict[str, Any]:
        """Begin's and Prepare's checks, nothing started (tasks/migrate_plan.dry_run)."""
        from tasks.migrate_plan import dry_run  # start-up: --dry-run only

        return dry_run(self, domain, source, dest, **options)

    # -- sending and results -------------------------------------------------------------
    def _send(self, task: str, task_id: str, queue: str, args: tuple[Any, ...],
              kwargs: dict[str, Any], chain: list[dict[str, Any]] | None = None) -> None:
        """The message Celery's send_task pushes, then what it records beside it: the
        queue's bindings and the `task-sent` event (Flower's first sight of a task)."""
        message = envelope.task_message(task=task, task_id=task_id, queue=queue, args=args,
                                        kwargs=kwargs, chain=chain, reply_to=self.reply_to,
                                        delivery_tag=envelope.new_id(), sender=self.sender)
        with self._lock:
            self._clock += 1
            clock = self._clock
        event = envelope.sent_event(task=task, task_id=task_id, queue=queue, args=args,
                                    kwargs=kwargs, sender=self.sender, clock=clock,
                                    delivery_tag=envelope.new_id())
        self._run(pack("LPUSH", queue, message),
                  *(pack("SADD", key, member) for key, member in envelope.bindings(queue)),
                  pack("PUBLISH", envelope.event_channel(self.ep.db), event))

    def _forget(self, task_id: str) -> None:
        """As AsyncResult.forget(): the stored result goes."""
        with contextlib.suppress(OSError, resp.ReplyError):  # else it expires (a day)
            self._run(pack("DEL", meta_key(task_id)))

    def metas(self, task_ids: list[str]) -> list[dict[str, Any] | None]:
        """The stored results of `task_ids` (None: none stored yet)."""
        raw = self._run(*(pack("GET", meta_key(t)) for t in task_ids))
        return [None if r is None else decode(r) for r in raw]


def later_steps(p: MigrationParams, steps: list[Step], reply_to: str
                ) -> list[dict[str, Any]] | None:
    """The chain after its first task, as Celery embeds it in that task's message:
    the last task first."""
    rest = [envelope.signature(task.task_name, queue, task.task_id(p.job_id), reply_to)
            for task, queue, _ in steps[1:]]
    return rest[::-1] or None


class _Reader:
    """workers/heartbeat.py's readers over the client's connections."""

    def __init__(self, client: QuickClient) -> None:
        self.client = client

    def get(self, name: str) -> bytes | None:
        value = self.client._run(pack("GET", name))[0]
        return value if isinstance(value, bytes) else None

    def smembers(self, name: str) -> set[bytes]:
        return set(self.client._run(pack("SMEMBERS", name))[0])


class _Waiter:
    """A result's channel, subscribed before the task is sent (no announcement lost),
    read until the result is ready; the stored result is read at the start and every
    SLICE_S (an announcement missed while the broker was away is found so)."""

    def __init__(self, client: QuickClient, task_id: str,
                 parents: list[str] | None = None) -> None:
        self.client, self.task_id, self.parents = client, task_id, parents or []
        self.sub: Connection | None = None
        self._pending: tuple[int, int] | None = None
        self._subscribe(confirm=False)

    def _subscribe(self, confirm: bool = True) -> None:
        """SUBSCRIBE on a new connection; `confirm`: wait for the server's word (else
        `subscribed` does, before anything is sent whose result it announces)."""
        self.close()
        self.sub = self.client._open()
        self._pending = self.sub.start(pack("SUBSCRIBE", meta_key(self.task_id)))
        if confirm:
            self.subscribed()

    def subscribed(self) -> None:
        if self.sub is not None and self._pending is not None:
            pending, self._pending = self._pending, None
            self.sub.finish(pending)

    def close(self) -> None:
        if self.sub is not None:
            self.sub.close()
            self.sub = None

    def wait(self, timeout: float | None) -> dict[str, Any]:
        """The ready result (TimeoutError after `timeout` seconds; None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        step = PARENT_CHECK_S if self.parents else SLICE_S
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("The operation timed out.")
            meta = self._slice(step if left is None else min(step, left))
            if meta is not None:
                return meta

    def _slice(self, length: float) -> dict[str, Any] | None:
        try:
            if self.sub is None:
                self._subscribe()
            self.subscribed()  # before the read: a result stored after it is announced
            metas = self.client.metas([self.task_id, *self.parents])
            _raise_failed_parent(metas[1:])
            if metas[0] is not None and metas[0]["status"] in READY:
                return metas[0]
            assert self.sub is not None
            end = time.monotonic() + length
            while (left := end - time.monotonic()) > 0:
                msg = self.sub.read(left)
                if isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message":
                    meta = decode(msg[2])
                    if meta.get("status") in READY:
                        return meta
        except TimeoutError:
            return None
        except (OSError, resp.ReplyError):
            # The broker is away: subscribe again at the next slice (as Celery's result
            # consumer reconnects), until the caller's deadline.
            self.close()
            time.sleep(min(length, 0.5))
        return None


def _raise_failed_parent(metas: list[dict[str, Any] | None]) -> None:
    """As Celery's get() with follow_parents: the earliest failed task of the chain."""
    for meta in reversed(metas):
        if meta is not None and meta["status"] in RAISED:
            raise_error(meta, None)


class QuickJob:
    """A handle on a running migration, as tasks/migrate_client.MigrationJob."""

    def __init__(self, client: QuickClient, params: MigrationParams, last: str,
                 parents: list[str]) -> None:
        self.client, self.params = client, params
        self.last = last  # the chain's last task id
        self.parents = parents  # the earlier ones, nearest first

    @property
    def id(self) -> str:
        return self.params.job_id

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """The summary when the migration completed; raises its first error otherwise."""
        waiter = _Waiter(self.client, self.last, self.parents)
        try:
            meta = waiter.wait(timeout)
        except TimeoutError:
            raise HostUnavailableError(f"migration {self.id} did not end within {timeout}s") \
                from None
        finally:
            waiter.close()
        return dict(outcome(meta, None))

    def info(self) -> dict[str, Any]:
        """domjobinfo as the source sees it."""
        return dict(self.client.call(self.params.source, "domjobinfo",
                                     domain=self.params.domain))

    def done(self) -> bool:
        meta = self.client.metas([self.last])[0]
        return meta is not None and meta["status"] in READY

    def abort(self) -> Any:
        return self.client.signal(self.params.source, self.params.domain, "abort")


# -- results as Celery's Redis backend stores them ----------------------------------------

def decode(raw: bytes) -> dict[str, Any]:
    """A stored result, as kombu's JSON decodes it (its typed values: kombu's own hook)."""
    typed: list[bool] = []

    def hook(obj: dict[str, Any]) -> dict[str, Any]:
        if obj.keys() == {"__type__", "__value__"}:
            typed.append(True)
        return obj

    meta = json.loads(raw, object_hook=hook)
    if typed:  # dates, UUIDs, bytes...: rare in ferry's results
        from kombu.utils import json as kombu_json  # optional: for kombu's typed values

        kombu_loads: Callable[[bytes], Any] = kombu_json.loads  # unannotated in kombu
        meta = kombu_loads(raw)
    return dict(meta)


def outcome(meta: dict[str, Any], host: str | None) -> Any:
    """The result's value, or its error raised as tasks/connection.py raises it."""
    if meta["status"] in RAISED:
        raise_error(meta, host)
    return meta.get("result")


def raise_error(meta: dict[str, Any], host: str | None) -> None:
    """Rebuild a failure as Celery does (exception_to_python); a FerryError as it is,
    any other as a FerryError with its text (tasks/connection.py, migrate_client.py)."""
    try:
        exc = rebuild(meta.get("result"))
    except Exception as err:  # Celery's SecurityError or ValueError on a bad result
        exc = err
    if isinstance(exc, FerryError):
        raise exc
    raise FerryError(str(exc) or type(exc).__name__, host=host) from exc


def rebuild(info: Any) -> BaseException:
    """The exception of a stored failure (`exc_type`, `exc_module`, `exc_message`).

    As Celery: the class is looked up where the module is loaded, else stands in as a
    new class of that name; what is not an exception class is refused.  ferry's own
    modules are loaded for it (the CLI has not imported them all, Celery's client has)."""
    if not isinstance(info, dict):
        raise TypeError(f"If the stored exception isn't an instance of BaseException, it "
                        f"must be a dictionary.\nInstead got: {info}")
    if "exc_type" not in info:
        raise ValueError("Exception information must include the exception type")
    module, name = info.get("exc_module"), str(info["exc_type"])
    cls: Any = _lookup(module, name) if module else None
    if cls is None:
        cls = type(name, (Exception,), {"__module__": "celery.exceptions"})
    message = info.get("exc_message", "")
    if not isinstance(cls, type) or not issubclass(cls, BaseException):
        shown = name if module is None else f"{module}.{name}"
        raise _SecurityError(f"Expected an exception class, got {shown} with payload "
                             f"{message}")
    try:
        made = cls(*message) if isinstance(message, list | tuple) else cls(message)
    except Exception:
        made = Exception(f"{cls}({message})")
    return made if isinstance(made, BaseException) else Exception(str(made))


def _lookup(module: str, name: str) -> Any:
    found: Any = sys.modules.get(module)
    if found is None and module.startswith(_FERRY_PACKAGES):
        try:
            __import__(module)  # not importlib's: one import less at every start
        except ImportError:
            return None
        found = sys.modules[module]
    try:
        for part in name.split("."):
            found = getattr(found, part)
    except AttributeError:
        return None
    return found


class _SecurityError(Exception):
    """Celery's name for a stored failure that names something not an exception."""


# -- job signals (workers/jobsignals/sender.py's protocol) --------------------------------

class _NoOwner(Exception):
    """PUBLISH reached nobody: no job runs (sender.py's NoJobOwnerError)."""


def _signal(client: QuickClient, uuid: str, op: str, args: dict[str, Any],
            timeout_s: float) -> Any:
    """Publish `op` on the domain's channel and wait for the owner's reply."""
    from workers.jobsignals.protocol import job_channel  # start-up: as in signal()

    reply_to = f"ferry.reply.{envelope.new_id()}"  # protocol.reply_channel's form
    sig_id = envelope.new_id()
    sig = json.dumps({"id": sig_id, "op": op, "args": args or {}, "reply_to": reply_to})
    sub: Connection | None = None
    try:
        sub = client._open()
        sub.call(pack("SUBSCRIBE", reply_to))
        if client._run(pack("PUBLISH", job_channel(uuid), sig))[0] == 0:
            raise _NoOwner
        return _reply(sub, sig_id, op, uuid, timeout_s)
    except (OSError, resp.ReplyError) as exc:
        raise HostUnavailableError(f"cannot send {op} for domain {uuid}: the broker does not "
                                   f"answer ({exc})") from exc
    finally:
        if sub is not None:
            sub.close()


def _reply(sub: Connection, sig_id: str, op: str, uuid: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = sub.read(left)
        except TimeoutError:
            break
        if not (isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message"):
            continue
        reply = json.loads(msg[2])
        if reply.get("id") != sig_id:
            continue
        if not reply.get("ok"):
            raise FerryError(str(reply.get("error") or f"{op} failed"))
        return reply.get("result")
    raise HostUnavailableError(f"the job owner of domain {uuid} did not answer {op} "
                               f"within {timeout_s:.1f}s")

