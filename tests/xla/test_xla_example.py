"""examples/train.py under the XLA strategy reaches the loss of the plain CPU run.

Three runs of ``examples/train.py --quick`` at once, each a fresh process: plain CPU torch (no
PJRT_DEVICE: `detect()` gives Single), one XLA device (PJRT_DEVICE=CPU: `detect()` gives XLA,
batches come through torch_xla's parallel loader), and SPMD over two XLA devices
(CPU_NUM_DEVICES=2, XLA_USE_SPMD=1: each batch split over a two-device mesh). The script is
unchanged between them.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).parents[2] / "examples" / "train.py"
XLA_VARIABLES = ("PJRT_DEVICE", "CPU_NUM_DEVICES", "XLA_USE_SPMD")
RESULT = re.compile(r"^(\w+), 1 process\(es\), precision no: loss ([\d.]+) -> ([\d.]+)", re.M)


def start(**variables: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if k not in XLA_VARIABLES} | variables
    return subprocess.Popen([sys.executable, str(EXAMPLE), "--quick"], env=environ, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def result(run: subprocess.Popen[str]) -> tuple[str, float, float, str]:
    out, err = run.communicate(timeout=240)
    assert run.returncode == 0, err[-3000:]
    found = RESULT.search(out)
    assert found, out
    sample = next(line for line in out.splitlines() if line.startswith("sample:"))
    return found[1], float(found[2]), float(found[3]), sample


def test_the_example_trains_under_xla_and_spmd_to_the_plain_cpu_loss() -> None:
    runs = {"cpu": start(), "xla": start(PJRT_DEVICE="CPU"),
            "spmd": start(PJRT_DEVICE="CPU", CPU_NUM_DEVICES="2", XLA_USE_SPMD="1")}
    got = {name: result(run) for name, run in runs.items()}
    strategy, first, last, sample = got["cpu"]
    assert strategy == "single" and last < first - 0.3  # it learns
    for name in ("xla", "spmd"):
        xla_strategy, xla_first, xla_last, xla_sample = got[name]
        assert xla_strategy == "xla", name
        assert abs(xla_first - first) <= 0.01 and abs(xla_last - last) <= 0.01, (name, got)
        assert xla_sample == sample, (name, got)  # greedy decoding agrees character by character
