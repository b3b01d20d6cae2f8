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


def test_env_report_names_missing_config(tmp_path: pytest.TempPathFactory) -> None:
    missing = str(tmp_path / "nope.yaml")  # type: ignore[operator]
    assert f"config file  {missing} (none)" in environment_report(missing)


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
