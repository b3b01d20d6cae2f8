"""The README opens with exactly the two commands a new user needs, and CI runs the second."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _first_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    head = text.split("## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", head, re.S)]


def test_readme_opens_with_two_commands() -> None:
    commands = _first_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert "distlib launch" in main_job and "examples/train.py" in main_job
    assert "nox -s tests" in tests
    assert (ROOT / "examples" / "train.py").exists() or "examples/train.py" not in main_job


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert _first_commands()[1] in ci


def test_distribution_is_not_named_distlib() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^name = "torch-distlib"$', pyproject, re.M)
