"""The broken builds of tests/mutants.py stay applicable: each names a file that
exists, text found there exactly once, a change, and tests that exist."""

from __future__ import annotations

import ast

import pytest
from mutants import MUTANTS, ROOT, Mutant


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_applies_once_and_names_existing_tests(mutant: Mutant) -> None:
    source = (ROOT / mutant.path).read_text()
    assert source.count(mutant.old) == 1, mutant.path
    assert mutant.new != mutant.old
    if mutant.path.endswith(".py"):
        ast.parse(source.replace(mutant.old, mutant.new))  # broken in behaviour, not syntax
    for arg in mutant.tests:
        if arg.startswith("-"):
            continue
        path, _, name = arg.partition("::")
        tests = (ROOT / path).read_text()
        assert not name or f"def {name}(" in tests, arg


def test_mutant_names_are_unique() -> None:
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
