"""The mutants of `make mutants` still fit the code: each old text is there exactly once.

`make mutants` is not part of `make test`; this is, so a change that moves a
mutant's target fails here at once instead of when someone runs the mutants.
"""

from __future__ import annotations

import pytest

from scripts.devtools.mutants import MUTANTS, ROOT, Mutant


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_each_mutant_changes_exactly_one_place_and_names_tests_that_exist(
        mutant: Mutant) -> None:
    text = (ROOT / mutant.path).read_text()
    assert text.count(mutant.old) == 1, f"{mutant.name}: old text found {text.count(mutant.old)}x"
    assert mutant.new != mutant.old
    for test in mutant.tests:
        path, _, name = test.partition("::")
        assert (ROOT / path).is_file(), test
        if name:
            assert f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), test


def test_the_mutants_have_distinct_names() -> None:
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
