"""`python -m scripts.devtools.settings_doc`: the settings table of docs/settings.md.

The table (name, default, bounds, help; one row per setting) is made from the
declarations in config/settings.py, so the page cannot drift from the code.
Without options the table between the settings markers of docs/settings.md is
rewritten; `--check` changes nothing and exits 1 when the page is stale.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from config.settings import SPECS, Spec

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "settings.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"

# What the builtin parsers accept; ferry's own parsers say it in their docstring.
_BUILTIN_FORMS: dict[Any, str] = {str: "text", Path: "a path", int: "an integer"}


def _cell(text: str) -> str:
    """Plain text that stays in one table cell and shows `<...>` as written."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "\\|").replace("\n", " "))


def _code(text: str) -> str:
    """A code span in a table cell (only `|` needs escaping there)."""
    return "`" + text.replace("|", "\\|") + "`"


def show_default(spec: Spec) -> str:
    """The default as the table shows it; a default computed at start names its function."""
    make = spec.default
    if getattr(make, "__name__", "") != "<lambda>" and not isinstance(make, type):
        return _code(f"{make.__name__}()")
    value = make()
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return _code("on" if value else "off")
    if value == "" or value == ():
        return "(empty)"
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return _code(f"{value[0]}-{value[1]}")
    return _code(str(value))


def show_bounds(spec: Spec) -> str:
    """Numeric bounds where the setting has them, otherwise the form its parser accepts."""
    if spec.low is not None and spec.high is not None:
        return f"{spec.low}-{spec.high}"
    if spec.low is not None:
        return f">= {spec.low}"
    if spec.high is not None:
        return f"<= {spec.high}"
    if spec.parse in _BUILTIN_FORMS:
        return _BUILTIN_FORMS[spec.parse]
    doc = (spec.parse.__doc__ or "").strip()
    if not doc:
        raise ValueError(f"the parser of FERRY_{spec.name.upper()} has no docstring saying "
                         "what it accepts")
    return _cell(doc.splitlines()[0].rstrip("."))


def render(specs: Iterable[Spec] = SPECS) -> str:
    """The Markdown table of every setting, in declaration order."""
    rows = ["| name | default | bounds | help |", "| --- | --- | --- | --- |"]
    for spec in specs:
        rows.append(f"| `FERRY_{spec.name.upper()}` | {show_default(spec)} | "
                    f"{show_bounds(spec)} | {_cell(spec.help)} |")
    return "\n".join(rows) + "\n"


def splice(body: str, table: str) -> str:
    """`body` with `table` between the settings markers."""
    if BEGIN not in body or END not in body or body.index(BEGIN) > body.index(END):
        raise SystemExit(f"the settings page has no {BEGIN} ... {END} block")
    start, stop = body.index(BEGIN) + len(BEGIN), body.index(END)
    return body[:start] + "\n" + table + body[stop:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.devtools.settings_doc",
                                 description=__doc__)
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if docs/settings.md is stale")
    args = ap.parse_args(argv)
    body = DOC.read_text()
    fresh = splice(body, render())
    if args.check:
        if fresh != body:
            print(f"{DOC} is stale: run python -m scripts.devtools.settings_doc",
                  file=sys.stderr)
            return 1
        return 0
    if fresh != body:
        DOC.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
