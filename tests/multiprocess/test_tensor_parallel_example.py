"""examples/tensor_parallel.py, as a user runs it: `distlib launch --tp-size 2` with the defaults
(no strategy named: the mesh picks FSDP2 and the model's own TP plan) prints the same losses as
one plain process, under FSDP2 x TP and under HSDP x TP."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")  # the example builds a Llama from a transformers config

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "tensor_parallel.py"


def _run(prefix: list[str]) -> tuple[str, list[float]]:
    done = subprocess.run([*prefix, str(SCRIPT)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    mesh = re.search(r"^mesh (.*)$", done.stdout, re.M)
    losses = re.search(r"^losses (.*)$", done.stdout, re.M)
    assert mesh and losses, done.stdout
    return mesh.group(1), [float(v) for v in losses.group(1).split()]


def test_the_example_on_a_mesh_prints_the_losses_of_one_process() -> None:
    alone_mesh, alone = _run([sys.executable])
    assert alone_mesh.startswith("dp_shard=1 (single, 1 process")
    assert alone[-1] < alone[0] - 1.0  # it learns
    launch = [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "4",
              "--tp-size", "2"]
    for extra, want in (([], "dp_shard=2 x tp=2 (fsdp, 4 process(es))"),
                        (["--dp-replicate-size", "2"], "dp_replicate=2 x tp=2 (fsdp, 4 process(es))")):
        mesh, losses = _run([*launch, *extra])
        assert mesh == want
        assert losses == pytest.approx(alone, rel=1e-4), (extra, losses, alone)
