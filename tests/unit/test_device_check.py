"""The GPU proof kit's CPU dry run: ``tests/gpu/device_check.sh`` must not rot between GPU visits.

Without CUDA (forced here with ``CUDA_VISIBLE_DEVICES=""``) the kit says "no CUDA: skipped",
still collects the GPU tests and runs each GPU benchmark's tiny CPU ``--dry-run`` through the
same code, writes its JSON summary under ``$OUT`` and exits 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_device_check_dry_run_says_skipped_and_checks_the_kit(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env |= {"PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "tests/gpu/device_check.sh")], env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device_check: no CUDA: skipped" in proc.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cuda"] is False
    assert summary["status"] == "skipped: no CUDA (dry run passed)"
    phases = summary["phases"]
    assert set(phases) == {"pytest", "bench_gpu_load", "bench_gpu_generate", "bench_gpu_train"}
    assert all(p["status"] == "passed" for p in phases.values()), phases
    collected = int(phases["pytest"]["collected"].split()[0])
    assert collected >= 25, phases["pytest"]  # every GPU test still imports and collects
    load = phases["bench_gpu_load"]["result"]
    assert load["dry_run"] and load["same_weights"] is True
    generate = phases["bench_gpu_generate"]["result"]
    assert generate["tokens_equal_whole_model"] == {"distlib": True, "accelerate": True}
    assert phases["bench_gpu_train"]["result"]["cases"][0]["steps_per_s"]["distlib"] > 0
    assert (tmp_path / "out" / "pytest.log").exists()


def test_device_check_reports_a_broken_phase(tmp_path: Path) -> None:
    """A benchmark that fails is a failed dry run (exit 1), named in the summary."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env |= {"OUT": str(tmp_path / "out"), "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/gpu/device_check.py"), "--only",
                           "gpu_train", "--budget-s", "0"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["phases"]["bench_gpu_train"]["status"] == "not run: out of time"
    assert summary["status"] == "failed: the dry run"
