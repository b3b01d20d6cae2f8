"""torchrun's and Accelerate's command lines, run as their users type them: real ranks through
``distlib launch`` (gloo on 127.0.0.1), each writing what it was handed to a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from distlib.testing import free_port

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[2]

# What each rank was handed: torch's variables, torch's rendezvous run id, and distlib's Env.
RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import distlib
    env = distlib.detect()
    seen = {name: os.environ.get(name) for name in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    seen |= {"strategy": env.strategy.name, "precision": str(env.precision.value),
             "argv": sys.argv[1:]}
    with open(os.path.join(os.environ["OUT"], "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(seen, f)
""")


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISTLIB_CONFIG_FILE", "XDG_CACHE_HOME", "HF_HOME")}
    env |= {"OUT": str(cwd), "HOME": str(cwd), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "distlib", "launch", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=180)


def _seen(folder: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in folder.glob("rank*.json")}


def test_a_torchrun_command_line_starts_two_ranks(tmp_path: Path) -> None:
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    port = free_port()
    done = _launch(["--nnodes", "1", "--nproc-per-node", "2", "--master-port", str(port),
                    "--master_addr=127.0.0.1", "--node_rank=0", "--rdzv-id", "job7", "--cpu",
                    "rank.py", "--lr", "3"], tmp_path)
    assert done.returncode == 0, done.stderr
    seen = _seen(tmp_path)
    assert sorted(seen) == [0, 1]
    for rank, got in seen.items():
        assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"]) == (str(rank), "2", str(rank))
        assert (got["MASTER_ADDR"], got["MASTER_PORT"]) == ("127.0.0.1", str(port))
        assert got["TORCHELASTIC_RUN_ID"] == "job7"  # --rdzv-id reached torch's rendezvous
        assert got["argv"] == ["--lr", "3"]


def test_an_accelerate_command_line_beats_accelerates_default_config(tmp_path: Path) -> None:
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    config = tmp_path / ".cache" / "huggingface" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump({  # Accelerate's default file ($HOME is tmp_path)
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP",
        "num_processes": 1, "use_cpu": True, "mixed_precision": "no",
        "fsdp_config": {"fsdp_sharding_strategy": "FULL_SHARD"}}))
    done = _launch(["--multi_gpu", "--nproc_per_node=2", "--mixed_precision", "bf16",
                    "--num_cpu_threads_per_process", "1", "--standalone", "rank.py"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"Accelerate's default config file is read: {config}" in done.stderr
    assert "ignored (strategy is ddp)" in done.stderr
    seen = _seen(tmp_path)
    assert sorted(seen) == [0, 1]
    for got in seen.values():
        assert (got["WORLD_SIZE"], got["strategy"], got["precision"]) == ("2", "ddp", "bf16")
        assert got["MASTER_ADDR"] == "127.0.0.1" and got["MASTER_PORT"] != "0"
