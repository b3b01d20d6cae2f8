"""`distlib --help` answers without torch; `distlib env` reports what a bug report needs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distlib.cli import main
from distlib.cli.env import environment_report


def test_help_does_not_import_torch() -> None:
    code = ("import sys\nfrom distlib.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert "usage: distlib" in out and "env" in out
    assert out.strip().endswith("NO-TORCH")


def test_python_dash_m_distlib_env(tmp_path: pytest.TempPathFactory) -> None:
    config = tmp_path / "cfg.yaml"  # type: ignore[operator]
    config.write_text("num_processes: 2\n")
    out = subprocess.run([sys.executable, "-m", "distlib", "env", "--config-file", str(config)],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    for needle in ("distlib ", "torch ", "python ", "gpus ", "env          Env(rank=0",
                   f"config file  {config}", "  num_processes: 2"):
        assert needle in out, needle


def test_env_reports_the_detected_mesh_and_this_ranks_place(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from distlib.cli.env import mesh_line
    from distlib.env import Env
    from distlib.topology import Mesh

    for name, value in {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2",
                        "LOCAL_WORLD_SIZE": "4", "DISTLIB_LAUNCHED": "1", "DISTLIB_CPU": "1",
                        "DISTLIB_MESH": "dp_replicate=1,dp_shard=2,cp=1,tp=2"}.items():
        monkeypatch.setenv(name, value)
    report = environment_report("/nonexistent.yaml")
    assert ("mesh         dp_shard=2 x tp=2; rank 2 at dp_replicate=0 dp_shard=1 cp=0 tp=0, "
            "data-parallel rank 1 of 2") in report
    assert "mesh=Mesh(dp_replicate=1, dp_shard=2, cp=1, tp=2)" in report
    assert mesh_line(Env()) == ("dp_shard=1; rank 0 at dp_replicate=0 dp_shard=0 cp=0 tp=0, "
                                "data-parallel rank 0 of 1")
    assert mesh_line(Env(rank=1, world_size=8, local_rank=1, local_world_size=8,
                         mesh=Mesh(dp_replicate=2, cp=2, tp=2))).startswith(
        "dp_replicate=2 x cp=2 x tp=2; rank 1 at dp_replicate=0 dp_shard=0 cp=0 tp=1, "
        "data-parallel rank 0 of 2")


def test_env_report_names_missing_config(tmp_path: pytest.TempPathFactory) -> None:
    missing = str(tmp_path / "nope.yaml")  # type: ignore[operator]
    assert f"config file  {missing} (none)" in environment_report(missing)


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
