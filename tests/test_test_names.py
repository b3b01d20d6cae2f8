"""Test files have unique basenames: pytest's default import mode (no __init__.py under tests/)
refuses two test modules of one name at collection, which only a whole-suite run would show."""

from __future__ import annotations

import collections
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent


def test_every_test_file_name_is_unique() -> None:
    names = collections.Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert not [n for n, count in names.items() if count > 1]
