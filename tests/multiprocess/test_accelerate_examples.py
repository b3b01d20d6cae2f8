"""Accelerate's examples, ported to distlib, run as their users run them (launcher defaults).

The nlp example trains the same under ``distlib launch`` and under ``torchrun`` (bitwise: the
shuffle comes from the seeded torch RNG, every rank has the launcher's thread count), and its
evaluation counts exactly the evaluation set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distlib.testing import free_port

pytestmark = pytest.mark.multiprocess
TIMEOUT = 300
ROOT = Path(__file__).resolve().parents[2]
NLP = ROOT / "examples" / "accelerate" / "nlp_example.py"
SMALL = ["--epochs", "1", "--train-size", "192", "--eval-size", "50", "--warmup", "2"]


def _environ(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "DISTLIB_CONFIG_FILE")}
    env["XDG_CACHE_HOME"] = str(tmp_path)  # no user config file
    return env


def _run(cmd: list[str], tmp_path: Path, name: str) -> dict[str, object]:
    out = tmp_path / f"{name}.json"
    subprocess.run([*cmd, *SMALL, "--output", str(out)], env=_environ(tmp_path), check=True,
                   timeout=TIMEOUT, cwd=ROOT, stdout=subprocess.DEVNULL)
    return dict(json.loads(out.read_text()))


def test_nlp_example_under_distlib_launch_equals_torchrun(tmp_path: Path) -> None:
    ours = _run([sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
                 str(NLP)], tmp_path, "distlib")
    again = _run([sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
                  str(NLP)], tmp_path, "again")
    torchrun = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                     "--master-port", str(free_port()), str(NLP), "--cpu"], tmp_path, "torchrun")
    assert ours["world_size"] == torchrun["world_size"] == 2
    assert ours["threads"] == max(1, _cores() // 2)  # the cores shared by the two ranks
    assert torchrun["threads"] == 1  # torchrun's OMP_NUM_THREADS=1
    assert ours["losses"] == again["losses"]  # dl.seed makes the shuffle repeat
    if ours["threads"] == torchrun["threads"]:  # the same kernels: bitwise the same run
        assert ours["losses"] == torchrun["losses"]
        assert ours["metrics"] == torchrun["metrics"]
    else:  # other thread counts sum in another order
        assert ours["losses"] == pytest.approx(torchrun["losses"], rel=1e-4)
    assert [m["count"] for m in ours["metrics"]] == [50]  # exactly the evaluation set
    assert len(ours["losses"]) == 192 // 16 // 2


def _cores() -> int:
    import psutil

    allowed = len(os.sched_getaffinity(0))
    return min(psutil.cpu_count(logical=False) or allowed, allowed)


CKPT = ROOT / "examples" / "accelerate" / "checkpointing.py"


def test_checkpointing_example_resumes_exactly(tmp_path: Path) -> None:
    """Upstream's resume arithmetic (``resume_step // len(loader)``) on a run stopped mid-epoch:
    the resumed steps equal the uninterrupted run's bitwise (dropout and shuffle included)."""
    launch = [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
              str(CKPT), "--epochs", "2", "--train-size", "160", "--eval-size", "20"]
    steps_per_epoch = 160 // 16 // 2
    environ = _environ(tmp_path)

    def run(name: str, *extra: str) -> dict[str, list[object]]:
        out = tmp_path / f"{name}.json"
        subprocess.run([*launch, "--output", str(out), *extra], env=environ, check=True,
                       timeout=TIMEOUT, cwd=ROOT, stdout=subprocess.DEVNULL)
        return dict(json.loads(out.read_text()))

    whole = run("whole")
    stop = steps_per_epoch + 3  # mid-way through the second epoch
    run("first", "--checkpointing_steps", "4", "--output_dir", str(tmp_path / "ckpt"),
        "--stop_after", str(stop))
    resumed = run("resumed", "--resume_from_checkpoint", str(tmp_path / "ckpt" / "step_8"))
    assert len(whole["losses"]) == 2 * steps_per_epoch
    assert [s for s, _ in resumed["losses"]] == list(range(9, 2 * steps_per_epoch + 1))
    assert resumed["losses"] == whole["losses"][8:]
    assert resumed["last_layer"] == whole["last_layer"]
