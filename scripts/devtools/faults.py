"""`python -m scripts.devtools.faults`: run the fault matrix and print it as a Markdown table.

The cases are those of tests/e2e/faultcases.py, run by
tests/e2e/test_fault_matrix.py (pytest, real processes); each case appends its
result to a report file, read back here.  `--docs` also puts the table in
docs/faults.md, between the faults-matrix markers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.faultcases import Result, cases, markdown

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "faults.md"
BEGIN, END = "<!-- faults-matrix:begin -->", "<!-- faults-matrix:end -->"


def run_matrix(select: str | None) -> tuple[list[Result], int, float]:
    with tempfile.TemporaryDirectory(prefix="ferry-faults-") as tmp:
        report = Path(tmp) / "report.jsonl"
        argv = [sys.executable, "-m", "pytest", "-q", "tests/e2e/test_fault_matrix.py",
                *(["-k", select] if select else [])]
        started = time.monotonic()
        rc = subprocess.call(argv, cwd=ROOT, env={**os.environ,
                                                  "FERRY_FAULT_REPORT": str(report),
                                                  "FERRY_FAULTS_ALL": "1"})
        elapsed = time.monotonic() - started
        rows = [Result(**json.loads(line)) for line in report.read_text().splitlines()] \
            if report.exists() else []
    order = {c.id: i for i, c in enumerate(cases())}
    return sorted(rows, key=lambda r: order.get(r.case, len(order))), rc, elapsed


def render(results: list[Result], elapsed: float) -> str:
    passed = sum(r.passed for r in results)
    head = (f"Fault matrix, {time.strftime('%Y-%m-%d', time.gmtime())}: {passed} of "
            f"{len(results)} cases hold their expected outcome and invariants "
            f"({elapsed:.0f} s in all).\n\n")
    return head + markdown(results)


def read_page(page: Path = DOCS) -> str:
    """The text of the page the table goes in; exits with one error line if it cannot."""
    name = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
    try:
        body = page.read_text()
    except FileNotFoundError:
        raise SystemExit(f"error: {name} does not exist (the table goes in it)") from None
    if BEGIN not in body or END not in body:
        raise SystemExit(f"error: {name} has no {BEGIN} ... {END} block")
    return body


def put_in_docs(text: str, page: Path = DOCS) -> None:
    """Replace what stands between the faults-matrix markers of `page` with `text`."""
    body = read_page(page)
    start, stop = body.index(BEGIN) + len(BEGIN), body.index(END)
    page.write_text(body[:start] + "\n" + text + body[stop:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.devtools.faults", description=__doc__)
    ap.add_argument("-k", dest="select", help="only the cases pytest -k selects")
    ap.add_argument("--docs", action="store_true",
                    help="also write the table into docs/faults.md")
    args = ap.parse_args(argv)
    if args.docs:
        read_page()  # before the matrix's minutes, not after
    results, rc, elapsed = run_matrix(args.select)
    text = render(results, elapsed)
    print(text)
    if args.docs:
        put_in_docs(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
