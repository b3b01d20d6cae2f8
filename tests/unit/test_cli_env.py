"""`distlib --help` answers without torch; `distlib env` gives a report to paste into an issue."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distlib import __version__
from distlib.cli import main
from distlib.cli.env import HEADER, env_lines, environment_report, mesh_line
from distlib.env import Env, Hardware
from distlib.errors import ConfigError
from distlib.topology import Mesh

ROOT = Path(__file__).resolve().parents[2]


def _section(report: str, title: str) -> list[str]:
    """The indented lines under ``- title`` (up to the next ``- `` line)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"- {title}"))
    out = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        out.append(line)
    return out


def test_help_does_not_import_torch() -> None:
    code = ("import sys\nfrom distlib.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert "usage: distlib" in out and "env" in out
    assert out.strip().endswith("NO-TORCH")


def test_python_dash_m_distlib_env_is_a_report_to_paste(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("num_processes: 2\nprecision: bf16\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DISTLIB_")}
    environ |= {"PYTHONPATH": str(ROOT), "DISTLIB_PRECISION": "fp16"}
    done = subprocess.run([sys.executable, "-m", "distlib", "env", "--config-file", str(config)],
                          capture_output=True, text=True, check=True, timeout=120, env=environ)
    report = done.stdout
    assert report.startswith(HEADER + "\n\n- ")
    assert HEADER == "Copy-and-paste the text below in your GitHub issue"
    assert f"- distlib version: {__version__} ({ROOT / 'distlib'})" in report
    assert f"- Python version: {sys.version.split()[0]}" in report
    assert f"- PyTorch version: {torch.__version__} (CUDA {torch.version.cuda or 'none'}" in report
    assert [line.split(":")[0].strip() for line in _section(report, "Optional libraries")][:3] == [
        "deepspeed", "torch_xla", "transformers"]
    ram = re.search(r"^- RAM: ([\d.]+) GiB total, ([\d.]+) GiB available$", report, re.M)
    assert ram and 0 < float(ram[2]) <= float(ram[1]), report
    cores = re.search(r"^- CPU cores: (\d+) \((\d+) usable by this process\)$", report, re.M)
    assert cores and int(cores[1]) == os.cpu_count() and 1 <= int(cores[2]) <= int(cores[1])
    gpus = torch.cuda.device_count()
    assert f"- GPUs: {gpus or 'none'}" in report
    assert len([line for line in _section(report, "GPUs") if "GiB" in line]) == gpus
    assert _section(report, "Launch variables") == ["  DISTLIB_PRECISION=fp16"]
    fields = [line.strip().split(": ", 1) for line in _section(report, "Env (detect())")]
    assert [name for name, _ in fields] == [f.name for f in dataclasses.fields(Env)]
    assert dict(fields)["rank"] == "0" and dict(fields)["precision"] == "fp16"
    assert f"- Config file: {config}\n  num_processes: 2\n  precision: bf16" in report
    assert done.stderr == ""


def test_env_reports_the_detected_mesh_and_this_ranks_place() -> None:
    environ = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
               "DISTLIB_LAUNCHED": "1", "DISTLIB_CPU": "1",
               "DISTLIB_MESH": "dp_replicate=1,dp_shard=2,cp=1,tp=2"}
    report = environment_report(environ=environ | {"HOME": "/nonexistent"})
    assert ("- Mesh: dp_shard=2 x tp=2; rank 2 at dp_replicate=0 dp_shard=1 cp=0 tp=0, "
            "data-parallel rank 1 of 2") in report
    env = _section(report, "Env (detect())")
    assert "  mesh: Mesh(dp_replicate=1, dp_shard=2, cp=1, tp=2)" in env
    assert "  rank: 2" in env and "  world_size: 4" in env and "  launcher: distlib" in env
    assert _section(report, "Launch variables") == [
        "  DISTLIB_CPU=1", "  DISTLIB_LAUNCHED=1", "  DISTLIB_MESH=dp_replicate=1,dp_shard=2,"
        "cp=1,tp=2", "  RANK=2", "  WORLD_SIZE=4", "  LOCAL_RANK=2", "  LOCAL_WORLD_SIZE=4"]
    assert mesh_line(Env()) == ("dp_shard=1; rank 0 at dp_replicate=0 dp_shard=0 cp=0 tp=0, "
                                "data-parallel rank 0 of 1")
    assert mesh_line(Env(rank=1, world_size=8, local_rank=1, local_world_size=8,
                         mesh=Mesh(dp_replicate=2, cp=2, tp=2))).startswith(
        "dp_replicate=2 x cp=2 x tp=2; rank 1 at dp_replicate=0 dp_shard=0 cp=0 tp=1, "
        "data-parallel rank 0 of 2")


def test_env_lines_show_every_field_once() -> None:
    env = Env(rank=3, world_size=8, local_rank=1, local_world_size=4, node_rank=1, num_nodes=2,
              precision="bf16", strategy="fsdp", mesh=Mesh(dp_shard=4, tp=2))
    lines = env_lines(env)
    assert len(lines) == len(dataclasses.fields(Env))
    shown = dict(line.strip().split(": ", 1) for line in lines)
    assert shown["precision"] == "bf16" and shown["node_rank"] == "1"
    assert shown["strategy"].startswith("FSDP(") and shown["mesh"] == repr(env.mesh)


def test_env_never_stops_at_a_broken_environment(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    base = {"XDG_CACHE_HOME": str(tmp_path)}
    none = environment_report(environ=base)
    assert f"- Config file: {tmp_path / 'distlib' / 'default_config.yaml'} (none)" in none
    broken = environment_report(environ=base | {"DISTLIB_CONFIG_FILE": missing})
    assert (f"- Config file: DISTLIB_CONFIG_FILE must name an existing file, but got "
            f"DISTLIB_CONFIG_FILE={missing!r}") in broken
    bad = environment_report(environ=base | {"DISTLIB_LAUNCHED": "1", "RANK": "x",
                                             "WORLD_SIZE": "2"})
    assert "- Env (detect()): cannot be built: " in bad and "'x'" in bad
    with pytest.raises(ConfigError, match="--config-file must name an existing file"):
        environment_report(missing, environ=base)


def test_env_lists_each_gpu_with_its_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from distlib.cli import env as command

    class Properties:
        def __init__(self, index: int) -> None:
            self.name, self.total_memory = f"NVIDIA H200 #{index}", 150_000_000_000

    monkeypatch.setattr(command, "probe_hardware", lambda: Hardware(num_gpus=2))
    monkeypatch.setattr(torch.cuda, "get_device_properties", Properties)
    report = environment_report(environ={})
    assert _section(report, "GPUs: 2") == ["  cuda:0: NVIDIA H200 #0, 139.70 GiB",
                                           "  cuda:1: NVIDIA H200 #1, 139.70 GiB"]
    assert "  device: cuda:0" in _section(report, "Env (detect())")


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
