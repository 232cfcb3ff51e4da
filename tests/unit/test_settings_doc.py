"""docs/settings.md holds the table the generator makes from config/settings.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import SPECS, Spec
from scripts.devtools import settings_doc


def _block(body: str) -> str:
    start = body.index(settings_doc.BEGIN) + len(settings_doc.BEGIN)
    return body[start:body.index(settings_doc.END)]


def test_the_settings_page_is_not_stale() -> None:
    body = settings_doc.DOC.read_text()
    assert _block(body) == "\n" + settings_doc.render(), (
        "docs/settings.md is stale: run python -m scripts.devtools.settings_doc")


def test_every_setting_has_a_row_with_default_bounds_and_help() -> None:
    rows = settings_doc.render().splitlines()[2:]
    assert len(rows) == len(SPECS)
    for spec, row in zip(SPECS, rows, strict=True):
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[0] == f"`FERRY_{spec.name.upper()}`"
        assert len(cells) == 4 and all(cells), row


def test_cells_keep_the_table_whole() -> None:
    spec = Spec("x", str, lambda: "a|b", "one <b>|</b> two", 1, 9)
    row = settings_doc.render([spec]).splitlines()[2]
    assert row == r"| `FERRY_X` | `a\|b` | 1-9 | one &lt;b&gt;\|&lt;/b&gt; two |"


def test_a_parser_must_say_what_it_accepts() -> None:
    def undocumented(text: str) -> str:
        return text

    with pytest.raises(ValueError, match="FERRY_X"):
        settings_doc.render([Spec("x", undocumented, lambda: "", "help")])


def test_check_fails_on_a_stale_page_and_passes_once_rewritten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = tmp_path / "settings.md"
    page.write_text(f"# Settings\n\n{settings_doc.BEGIN}\n| old |\n{settings_doc.END}\n\nafter\n")
    monkeypatch.setattr(settings_doc, "DOC", page)
    assert settings_doc.main(["--check"]) == 1
    assert "| old |" in page.read_text()
    assert settings_doc.main([]) == 0
    assert settings_doc.main(["--check"]) == 0
    body = page.read_text()
    assert body.startswith("# Settings\n\n") and body.endswith(f"{settings_doc.END}\n\nafter\n")
    assert _block(body) == "\n" + settings_doc.render()
