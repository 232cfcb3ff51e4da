"""A task message as Celery's `send_task` puts it in Redis, built without Celery.

The `ferry` command sends its tasks with config/resp.py and these functions,
~0.3 s sooner than through Celery (whose import alone costs that).  What it
pushes must be what Celery would have pushed, byte for byte but for ids and
times: protocol 2 (headers, properties, a base64 JSON body of `[args, kwargs,
embed]`), kombu's Redis envelope, the `task-sent` event Flower reads, the queue
binding kombu records.  tests/unit/test_envelope.py compares each with what
Celery 5.7 / kombu 5.7 produce for the same call.

Only what ferry's settings give Celery is reproduced: JSON serializer, no
compression, no signing (config/celery_app.py), priority 0, no eta, expiry or
time limits.  Anything else goes through Celery.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

REPR_MAXSIZE = 1024  # Celery's argsrepr_maxsize and kwargsrepr_maxsize
REPR_MAXLEVELS = 3  # Celery's task_repr_maxlevels
BINDING_SEP = "\x06\x16"  # kombu's Redis transport's separator in binding entries


def new_id() -> str:
    """A random UUID4 in text, as Celery's task ids (without the uuid module: start-up)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def origin() -> str:
    """Celery's name for a process that is not a worker (anon_nodename)."""
    return f"gen{os.getpid()}@{socket.gethostname()}"


def _dumps(value: Any) -> str:
    return json.dumps(value)  # kombu's json: the standard module's defaults


def task_message(*, task: str, task_id: str, queue: str, args: Sequence[Any] = (),
                 kwargs: dict[str, Any] | None = None,
                 chain: list[dict[str, Any]] | None = None, reply_to: str,
                 delivery_tag: str, sender: str) -> str:
    """What Celery LPUSHes to the queue's list for `send_task(task, args, kwargs,
    queue=queue, task_id=task_id)`; `chain`: the rest of a chain, last task first."""
    kwargs = kwargs or {}
    embed = {"callbacks": None, "errbacks": None, "chain": chain, "chord": None}
    body = _dumps([list(args), kwargs, embed]).encode()
    headers: dict[str, Any] = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": saferepr(tuple(args)), "kwargsrepr": saferepr(kwargs),
        "origin": sender, "ignore_result": None, "replaced_task_nesting": 0,
        "stamped_headers": None, "stamps": {},
    }
    return _dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "utf-8",
        "content-type": "application/json", "headers": headers,
        "properties": {"correlation_id": task_id, "reply_to": reply_to, "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue},
                       "priority": 0, "body_encoding": "base64",
                       "delivery_tag": delivery_tag},
    })


def signature(task: str, queue: str, task_id: str, reply_to: str) -> dict[str, Any]:
    """One later task of a chain, as it travels in the first task's body."""
    return {"task": task, "args": [], "kwargs": {},
            "options": {"queue": queue, "task_id": task_id, "reply_to": reply_to},
            "subtask_type": None, "immutable": False}


def sent_event(*, task: str, task_id: str, queue: str, args: Sequence[Any] = (),
               kwargs: dict[str, Any] | None = None, sender: str, delivery_tag: str,
               clock: int = 1, now: float | None = None) -> str:
    """The `task-sent` event Celery publishes after the message (Flower shows it)."""
    event = {"hostname": sender, "utcoffset": _utcoffset(), "pid": os.getpid(),
             "clock": clock, "uuid": task_id, "root_id": task_id, "parent_id": None,
             "name": task, "args": saferepr(tuple(args)), "kwargs": saferepr(kwargs or {}),
             "retries": 0, "eta": None, "expires": None, "queue": queue, "exchange": "",
             "routing_key": queue, "timestamp": time.time() if now is None else now,
             "type": "task-sent"}
    return _dumps({
        "body": base64.b64encode(_dumps(event).encode()).decode(),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"hostname": sender},
        "properties": {"delivery_mode": 1,
                       "delivery_info": {"exchange": "celeryev", "routing_key": "task.sent"},
                       "priority": 0, "body_encoding": "base64",
                       "delivery_tag": delivery_tag},
    })


def event_channel(db: int) -> str:
    """Where kombu's Redis transport publishes `task.sent` (fanout prefix on)."""
    return f"/{db}.celeryev/task.sent"


def bindings(queue: str) -> list[tuple[str, str]]:
    """The (set, member) pairs kombu adds when Celery declares the queue it sends to."""
    member = BINDING_SEP.join((queue, "", queue))
    return [(f"_kombu.binding.{queue}", member), (f"_kombu.binding_permanent.{queue}", member)]


def _utcoffset() -> float:
    """Hours to UTC, as celery.utils.time.utcoffset."""
    return (time.altzone if time.localtime().tm_isdst else time.timezone) / 3600


# -- Celery's saferepr (celery.utils.saferepr), for argsrepr and kwargsrepr ------------
# A stream of tokens; each shortens the budget by its length; once it is spent the
# text ends with ", ..." and the brackets still open.  Strings are quoted with ' and
# only ' escaped, truncated at a word; containers deeper than 3 show as {...}.

_Token = tuple[str, Any, str]  # (kind, value, closing bracket of an opening literal)
_SEPARATORS = (", ", ": ")


def saferepr(value: Any, maxlen: int = REPR_MAXSIZE, maxlevels: int = REPR_MAXLEVELS) -> str:
    out: list[str] = []
    ends: list[str] = []  # closing brackets of the containers open so far
    budget = maxlen
    for kind, val, end in _tokens(value, 0, maxlevels):
        if budget <= 0:
            if kind == "close":
                out.append(val)
                ends.pop()
                continue
            out.append(", ...")
            out.extend(reversed(ends))
            break
        if kind == "open":
            ends.append(end)
            text = val
        elif kind == "close":
            ends.pop()
            text = val
        elif kind == "key":
            text = saferepr(val, budget, maxlevels)
        elif kind == "quoted":
            text = _quoted(val, budget)
        elif kind == "lit":
            text = val
        else:
            text = _truncate(val, budget)
        out.append(text)
        budget -= len(text)
    return "".join(out)


def _tokens(value: Any, level: int, maxlevels: int) -> Iterator[_Token]:
    if isinstance(value, bool | int | float):
        yield ("text", str(value), "")
        return
    if isinstance(value, str | bytes):
        yield ("quoted", value, "")
        return
    if isinstance(value, tuple):
        start, end = "(", ",)" if len(value) == 1 else ")"
    elif isinstance(value, dict):
        start, end = "{", "}"
    elif isinstance(value, list):
        start, end = "[", "]"
    else:
        yield ("text", repr(value), "")
        return
    if maxlevels and level >= maxlevels:
        yield ("lit", f"{start}...{end}", "")
        return
    yield ("open", start, end)
    items = list(value.items()) if isinstance(value, dict) else list(value)
    for i, item in enumerate(items):
        if isinstance(value, dict):
            yield ("key", item[0], "")
            yield ("lit", _SEPARATORS[1], "")
            item = item[1]
        yield from _tokens(item, level + 1, maxlevels)
        if i < len(items) - 1:
            yield ("lit", _SEPARATORS[0], "")
    yield ("close", end, "")


def _truncate(text: str, maxlen: int) -> str:
    if maxlen and len(text) >= maxlen:
        return text[:maxlen].rsplit(" ", 1)[0] + "..."
    return text


def _quoted(value: str | bytes, maxlen: int) -> str:
    if isinstance(value, bytes):
        chunk = value[:maxlen] if maxlen and len(value) > maxlen else value
        try:
            shown = chunk.decode()
        except UnicodeDecodeError:
            shown = chunk.hex()
        return f"b'{shown}{'...' if chunk is not value else ''}'"
    return "'{}'".format(_truncate(value, maxlen).replace("'", "\\'"))
