"""examples/train.py learns: its loss falls, in one plain process and under `distlib launch`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train.py"


def _loss_falls(stdout: str) -> tuple[float, float]:
    match = re.search(r"loss (\d+\.\d+) -> (\d+\.\d+)", stdout)
    assert match, stdout
    first, last = float(match.group(1)), float(match.group(2))
    assert last < first - 0.5, (first, last)
    return first, last


def test_example_in_one_plain_process() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _loss_falls(done.stdout)
    assert "single, 1 process(es)" in done.stdout
    assert "sample: 'Four score and" in done.stdout


def test_example_under_distlib_launch_with_fsdp_and_accumulation() -> None:
    command = [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
               str(SCRIPT), "--quick", "--strategy", "fsdp", "--accumulate", "2",
               "--batch-size", "32"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _loss_falls(done.stdout)
    assert "fsdp, 2 process(es)" in done.stdout
    assert done.stdout.count("sample:") == 1  # printed by the main rank only
