"""examples/big_training.py, run as docs/big_training.md runs it: 2 processes stop after the
save at step 4, 3 processes resume from the latest checkpoint and finish the epoch.

Across the two jobs every sample of the epoch is trained on exactly once, `keep_last=2` leaves
the two newest checkpoints, and the exported weights load with transformers, moved by the
training away from the checkpoint the first job started from.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.multiprocess

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "big_training.py"


def _launch(cwd: Path, processes: int, *args: str) -> str:
    command = [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes",
               str(processes), str(SCRIPT), "--seen", str(cwd / "seen"), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _seen(cwd: Path) -> list[int]:
    return [int(line) for file in sorted(cwd.glob("seen.rank*"))
            for line in file.read_text(encoding="utf-8").split()]


def test_stop_at_two_processes_resume_at_three_every_sample_once(tmp_path: Path) -> None:
    first = _launch(tmp_path, 2, "--stop-at", "4")
    assert "resumed" not in first and "exported" not in first
    assert len(_seen(tmp_path)) == 4 * 2 * 4  # 4 steps x 2 ranks x batch 4
    ckpt = tmp_path / "runs" / "big" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-2", "step-4"]

    second = _launch(tmp_path, 3)
    assert "resumed from step-4 at 3 process(es)" in second
    assert "trained 7 steps" in second
    seen = _seen(tmp_path)
    assert sorted(seen) == list(range(68)), "each sample exactly once across the two jobs"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-4", "step-6"]  # keep_last=2

    final = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "runs" / "big" / "final")
    start = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "runs" / "big" / "pretrained")
    trained, initial = final.state_dict(), start.state_dict()
    assert trained.keys() == initial.keys()
    moved = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert "lm_head.weight" in moved and len(moved) > len(trained) // 2
