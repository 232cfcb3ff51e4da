"""What every `ferry` command module shares: the client, the host, input and output.

main.py and the command modules (migrate_cmd, image_cmd) import this; it
imports none of them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.cli import formats
from workers.errors import InvalidInputError

Handler = Callable[[argparse.Namespace], int]


def client() -> Any:
    """A client on the broker of the settings: the command's own (tasks/quick.py, no
    Celery to import) wherever it does exactly what Celery's would, else Celery's."""
    # Imported here, as everything a command needs only once it runs: `ferry --help`
    # and a wrong argument import neither client nor the settings.
    from config.settings import load
    from tasks.quick import QuickClient, unusable

    settings = load()
    if unusable(settings) is None:
        return QuickClient(settings)
    from tasks.client import Client

    return Client(settings)


def host_of(args: argparse.Namespace) -> str:
    """The host `-H` names, else FERRY_HOST."""
    if args.host:
        return str(args.host)
    from config.settings import load  # see client()

    return load().host


def emit(args: argparse.Namespace, value: Any, human: Callable[[Any], str]) -> int:
    """Print `value` as JSON with `--json`, else as `human` renders it."""
    print(formats.as_json(value) if getattr(args, "json", False) else human(value))
    return 0


def read_input(path: str) -> str:
    """The text of a file, or of stdin for `-`."""
    try:
        return Path(path).read_text() if path != "-" else sys.stdin.read()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from exc


class Formatter(argparse.HelpFormatter):
    """argparse's own, finding the terminal's width as shutil.get_terminal_size does
    without importing shutil (argparse builds a formatter for every argument added)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _columns() - 2 if width is None else width)


def _columns() -> int:
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:  # no stdout at all (None): AttributeError, as in shutil
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def domain_cmd(sub: Any, name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
    """A subcommand that acts on one host: `-H`, `--json`, and its handler."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_, formatter_class=Formatter)
    p.add_argument("-H", "--host", help="the host to act on (default: FERRY_HOST)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handler, quick_exit=True)
    return p
