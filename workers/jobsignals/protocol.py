"""Job signals on the wire: the channels and operations sender and listener agree on.

A signal is JSON ``{"id", "op", "args", "reply_to"}`` published on the domain's
channel ``ferry.job.<domain uuid>``; the job owner answers on ``reply_to`` with
``{"id", "ok": true, "result"}`` or ``{"id", "ok": false, "error"}``.
"""

from __future__ import annotations

import uuid as uuidlib

OPS = ("abort", "setspeed", "getspeed", "setmaxdowntime", "suspend", "postcopy", "jobinfo",
       "blkstat", "blkinfo")


def job_channel(uuid: str) -> str:
    """Where signals for the job of domain `uuid` are published."""
    return f"ferry.job.{uuid}"


def host_channel(host: str) -> str:
    """A channel of host `host` its listener stays subscribed to between jobs."""
    return f"ferry.host.{host}"


def reply_channel() -> str:
    """A new channel for one signal's reply."""
    return f"ferry.reply.{uuidlib.uuid4()}"
