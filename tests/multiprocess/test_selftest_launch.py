"""``distlib config`` then ``distlib test``, as a user runs them: the self-test passes for
configs whose options name a user's model (real ranks, gloo, 127.0.0.1)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from distlib.cli.config import QUESTIONS

pytestmark = pytest.mark.multiprocess
TIMEOUT = 300


def _distlib(args: list[str], cwd: Path, stdin: str | None = None
             ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)  # every command names its --config-file
    env.pop("DISTLIB_CONFIG_FILE", None)
    return subprocess.run([sys.executable, "-m", "distlib", *args], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=TIMEOUT)


def _answers(chosen: dict[str, str]) -> str:
    """The lines a user types at ``distlib config``'s questions: ``chosen`` by setting, the
    default (an empty line) elsewhere; questions about several machines and GPUs are not
    asked of a one-machine CPU job, those of a strategy only when it is chosen."""
    asked = {"always", chosen.get("strategy", "")}
    return "".join(chosen.get(s.name, "") + "\n" for s in QUESTIONS if s.ask_when in asked)


def _configure(work: Path, chosen: dict[str, str], extra: str = "") -> Path:
    path = work / "config.yaml"
    done = _distlib(["config", "--config-file", str(path)], work, _answers(chosen))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"distlib config: wrote {path}" in done.stdout
    if extra:  # a key distlib config does not ask about, added by hand
        path.write_text(path.read_text() + extra)
    return path


def _detail(stdout: str, check: str) -> str:
    lines = [line.split(None, 1)[1] for line in stdout.splitlines()
             if line.startswith(f"  {check} ")]
    assert len(lines) == 1, stdout
    return lines[0].strip()


def test_fsdp_with_wrap_classes_block_passes_the_self_test(tmp_path: Path) -> None:
    path = _configure(tmp_path, {"cpu": "yes", "num_processes": "2", "strategy": "fsdp",
                                 "fsdp_wrap_classes": "Block"})
    assert "fsdp_wrap_classes: Block" in path.read_text()
    done = _distlib(["test", "--config-file", str(path)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == f"distlib test: config {path}"
    assert done.stdout.splitlines()[-1] == "distlib test: PASSED (2 ranks, 7 checks each)"
    assert _detail(done.stdout, "training") == (
        "ranks 0-1: fsdp/no: 4 steps match 1 process (diff 3.0e-08, 2 FSDP units (Block))")
    assert _detail(done.stdout, "save_load") == "ranks 0-1: fsdp: saved and loaded 4 tensors exactly"
    assert "not checked" not in done.stdout and "FAIL" not in done.stdout


@pytest.mark.parametrize(("chosen", "flags", "training"), [
    ({"cpu": "yes", "num_processes": "2", "strategy": "fsdp", "fsdp_wrap_classes": "auto",
      "fsdp_activation_checkpointing": "yes"}, ["--fsdp-forward-prefetch"],
     "2 FSDP units (Block)"),
    ({"cpu": "yes", "num_processes": "2", "strategy": "fsdp",
      "fsdp_wrap_classes": "Embedding,Block,Head", "fsdp_state_dict_type": "full",
      "fsdp_cpu_offload": "yes", "fsdp_reshard_after_forward": "no"}, [],
     "4 FSDP units (Block, Embedding, Head)"),
    ({"cpu": "yes", "num_processes": "2", "strategy": "single"}, [],
     "(each rank alone: single)"),
], ids=["auto-checkpointing-prefetch", "three-classes-full-offload", "single-in-two-ranks"])
def test_configs_with_model_options_pass_the_self_test(tmp_path: Path, chosen: dict[str, str],
                                                       flags: list[str], training: str) -> None:
    path = _configure(tmp_path, chosen)
    done = _distlib(["test", "--config-file", str(path), *flags], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "distlib test: PASSED (2 ranks, 7 checks each)"
    assert training in _detail(done.stdout, "training")


def test_activation_checkpointing_without_units_is_reported_not_checked(tmp_path: Path) -> None:
    path = _configure(tmp_path, {"cpu": "yes", "num_processes": "2", "strategy": "fsdp",
                                 "fsdp_activation_checkpointing": "yes"})
    done = _distlib(["test", "--config-file", str(path)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-2] == (
        "  not checked     fsdp_activation_checkpointing: wrap applies it to FSDP units, and "
        "with no fsdp_wrap_classes and no fsdp_min_num_params no model has any (wrap "
        "refuses it on yours unless it has units)")
    assert done.stdout.splitlines()[-1] == "distlib test: PASSED (2 ranks, 7 checks each)"


DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4,
    "gradient_clipping": 0.5, "zero_optimization": {"stage": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": 0.001}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
def test_a_deepspeed_config_file_passes_less_its_optimizer_and_scheduler(tmp_path: Path) -> None:
    (tmp_path / "ds_config.json").write_text(json.dumps(DS_CONFIG))
    path = _configure(tmp_path, {"cpu": "yes", "num_processes": "2", "strategy": "deepspeed",
                                 "zero_stage": "1"},
                      extra="deepspeed_config_file: ds_config.json\n")
    done = _distlib(["test", "--config-file", str(path)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "distlib test: PASSED (2 ranks, 7 checks each)"
    assert lines[-3:-1] == [
        "  not checked     deepspeed_config_file: its `optimizer` block (AdamW): needs your "
        "model (the self-test trains with its own SGD)",
        "  not checked     deepspeed_config_file: its `scheduler` block (WarmupLR): needs your "
        "model (the self-test trains with its own SGD)"]
    assert _detail(done.stdout, "training").endswith("4 micro-steps a step, clip 0.5)")
