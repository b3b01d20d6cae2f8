"""examples/resume.py under `distlib launch --max-restarts 1`: a rank dies, the group restarts,
resumes from the last checkpoint, and ends with exactly the weights of a run that never died."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.multiprocess

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "resume.py"


def _launch(cwd: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
               "--max-restarts", "1", str(EXAMPLE), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_crashed_rank_resumes_to_the_same_weights(tmp_path: pathlib.Path) -> None:
    crashed = _launch(tmp_path, "--crash-at", "6", "--out", "a", "--result", "a.pt")
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    assert "attempt 1: resumed from step 6" in crashed.stdout
    assert "done at step 12" in crashed.stdout
    straight = _launch(tmp_path, "--out", "b", "--result", "b.pt")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "resumed" not in straight.stdout
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
