"""`ferry save`, `ferry restore`, `ferry dump`: a guest to a file and back (virsh's names).

Paths are made absolute here: the host agent opens them, in its own working
directory.  On a terminal a progress bar follows the job (domjobinfo).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from scripts.cli.common import client, domain_cmd, emit, host_of
from workers.errors import FerryError, InvalidInputError
from workers.image_format import COMPRESSORS, DUMP_FORMATS, read_header

IMAGE_TIMEOUT_S = 6 * 3600.0  # a large guest through xz takes a while


COMMANDS = ("save", "restore", "dump")


def add_parsers(sub: Any, only: str | None = None) -> None:
    """The parsers of COMMANDS (of `only` alone, when given)."""
    if only in (None, "save"):
        p = domain_cmd(sub, "save", cmd_save, "save a running guest's state to a file")
        p.add_argument("domain")
        p.add_argument("file")
        p.add_argument("--compress", choices=tuple(COMPRESSORS), default="raw",
                       help="compressor the image goes through (default: raw)")
        _run_state(p, "state the guest is restored in (default: as it was)")
        p.add_argument("--bypass-cache", action="store_true",
                       help="write the image with O_DIRECT (not through the page cache)")
    if only in (None, "restore"):
        p = domain_cmd(sub, "restore", cmd_restore, "restore a guest from a saved file")
        p.add_argument("file")
        p.add_argument("--xml", help="domain XML to restore with (checked for ABI stability)")
        _run_state(p, "state the guest starts in (default: as saved)")
    if only in (None, "dump"):
        p = domain_cmd(sub, "dump", cmd_dump, "dump a guest's memory to a file")
        p.add_argument("domain")
        p.add_argument("file")
        p.add_argument("--memory-only", action="store_true",
                       help="guest-physical memory only (needed by the kdump formats)")
        p.add_argument("--format", choices=DUMP_FORMATS, default="elf")
        p.add_argument("--live", action="store_true", help="do not pause the guest first")


def _run_state(p: argparse.ArgumentParser, help_: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--running", action="store_true", help=help_)
    group.add_argument("--paused", action="store_true", help=help_)


def _abspath(path: str) -> str:
    return os.path.abspath(path)


def cmd_save(a: argparse.Namespace) -> int:
    path = _abspath(a.file)
    info = _call(a, "save", a.domain, domain=a.domain, path=path, compression=a.compress,
                 running=a.running, paused=a.paused, bypass_cache=a.bypass_cache)
    return emit(a, info, lambda i: f"Domain '{i['name']}' saved to {path}")


def cmd_restore(a: argparse.Namespace) -> int:
    path = _abspath(a.file)
    xml = None
    if a.xml:
        try:
            xml = Path(a.xml).read_text()
        except OSError as exc:
            raise InvalidInputError(f"cannot read {a.xml}: {exc.strerror}") from exc
    info = _call(a, "restore", _saved_name(path), path=path, xml=xml, running=a.running,
                 paused=a.paused)
    return emit(a, info, lambda i: f"Domain '{i['name']}' restored from {path}")


def cmd_dump(a: argparse.Namespace) -> int:
    path = _abspath(a.file)
    info = _call(a, "dump", a.domain, domain=a.domain, path=path, memory_only=a.memory_only,
                 format=a.format, live=a.live)
    return emit(a, info, lambda i: f"Domain '{i['name']}' dumped to {path}")


def _saved_name(path: str) -> str | None:
    """The guest's name from the image header, when this machine can read the file."""
    # Imported here: the XML codec loads lxml, which only this command needs.
    from workers.domain_xml import parse_domain_xml

    try:
        with open(path, "rb") as f:
            xml = read_header(f, os.fstat(f.fileno()).st_size).xml
        return parse_domain_xml(xml, allow_qemu_commandline=True).name
    except Exception:  # the host reads it and reports what is wrong
        return None


def _call(a: argparse.Namespace, task: str, follow: str | None, **kwargs: Any) -> Any:
    """Run the task; on a terminal, with a progress bar from domjobinfo."""
    api, host = client(), host_of(a)
    if follow is None or a.json or not sys.stdout.isatty():
        return api.call(host, task, timeout=IMAGE_TIMEOUT_S, **kwargs)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = api.call(host, task, timeout=IMAGE_TIMEOUT_S, **kwargs)
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    _follow(api, host, follow, task, worker)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _follow(api: Any, host: str, domain: str, task: str, worker: threading.Thread) -> None:
    # Imported here: rich's progress bar is only drawn on a terminal.
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    with Progress(*columns, transient=True) as bar:
        shown = bar.add_task(f"{task} {domain}", total=None)
        while worker.is_alive():
            try:
                info = api.call(host, "domjobinfo", domain=domain, timeout=5)
            except FerryError:
                info = {}
            if info.get("operation") == task and info.get("data_total"):
                bar.update(shown, total=info["data_total"],
                           completed=info.get("data_processed") or 0)
            time.sleep(0.25)
