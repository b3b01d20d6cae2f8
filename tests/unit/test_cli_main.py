"""The ``distlib`` command as a whole: bare ``distlib``, one error prefix for every subcommand,
and a reader that stops early (``| head``) ending it quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distlib.cli import BROKEN_PIPE_EXIT, COMMANDS, error_line, main
from tests.child_env import child_environ


def _distlib(tmp_path: Path, *argv: str, **more: object) -> subprocess.CompletedProcess[str]:
    streams = more or {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.run([sys.executable, "-m", "distlib", *argv], text=True, timeout=120,
                          env=child_environ(tmp_path), cwd=tmp_path,
                          **streams)  # type: ignore[call-overload]


def test_bare_distlib_is_a_usage_error_and_help_is_not(tmp_path: Path) -> None:
    bare = _distlib(tmp_path)
    assert bare.returncode == 2 and bare.stdout == ""
    assert bare.stderr.startswith("usage: distlib") and "merge-weights" in bare.stderr
    helped = _distlib(tmp_path, "--help")
    assert helped.returncode == 0 and helped.stderr == ""
    assert helped.stdout == bare.stderr  # the same help, on stdout when asked for


# One bad input per subcommand, each failing with a DistlibError inside the command.
def _cases(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    existing = tmp_path / "exists.yaml"
    existing.write_text("num_processes: 1\n")
    counts = ["--num-processes", "3", "--num-machines", "2", "--main-port", "1234"]
    return {
        "env": (["--config-file", str(tmp_path / "missing.yaml")], {},
                "error: --config-file must name an existing file"),
        "plan": ([], {}, "must be given a CHECKPOINT (a device map) or --mesh"),
        "launch": ([*counts, "--dry-run", "x.py"], {}, "must be a multiple"),
        "config": (["--config-file", str(existing)], {}, "must not exist yet"),
        "test": (counts, {}, "must be a multiple"),
        "merge-weights": ([str(tmp_path / "no-checkpoint"), str(tmp_path / "out")], {},
                          "does not exist"),
        "estimate-memory": ([str(tmp_path / "missing.json")], {}, "does not exist"),
    }


def test_every_command_says_its_error_prefix_once(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DISTLIB_CONFIG_FILE", raising=False)
    cases = _cases(tmp_path)
    assert set(cases) == set(COMMANDS)  # a new command gets a case here
    for command, (argv, environ, needle) in cases.items():
        with monkeypatch.context() as patch:
            for name, value in environ.items():
                patch.setenv(name, value)
            assert main([command, *argv]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"distlib {command}: error: "), err
        assert err.count(": error:") == 1 and "error: distlib" not in err, err
        assert needle in err, (command, err)


def test_error_line_drops_a_repeated_command_name() -> None:
    for command in COMMANDS:
        for said in (f"distlib {command}: x must be 1, but got 2.",
                     f"distlib {command} x must be 1, but got 2.", "x must be 1, but got 2."):
            assert error_line(command, said) == f"distlib {command}: error: x must be 1, but got 2."
    assert error_line("test", "distlib launch: x.") == "distlib test: error: x."
    assert error_line("env", "distlibrary x.") == "distlib env: error: distlibrary x."


def _big_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint whose plan is > 64 KiB of text (more than a pipe holds)."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "wide.safetensors"
    save_file({f"model.decoder.blocks_of_the_model.block_{i}.weight": torch.zeros(2)
               for i in range(1500)},
              str(path))
    return path


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"a.w": torch.zeros(2), "b.w": torch.zeros(2)}, str(tmp_path / "s.safetensors"))
    # the reader is gone before anything is written: every write fails
    for argv in (["launch", "--help"], ["--help"], ["plan", str(tmp_path / "s.safetensors")]):
        read, write = os.pipe()
        os.close(read)
        try:
            done = _distlib(tmp_path, *argv, stdout=write, stderr=subprocess.PIPE)
        finally:
            os.close(write)
        # argparse itself ignores a failed write of the help (and exits 0)
        assert done.returncode in (0, BROKEN_PIPE_EXIT) and done.stderr == "", argv
        assert done.returncode == BROKEN_PIPE_EXIT or "--help" in argv
    # as users meet it: `distlib plan ... | head -n 1`
    plan = ["plan", str(_big_checkpoint(tmp_path)), "--max-memory", "cpu=10KB"]
    writer = subprocess.Popen([sys.executable, "-m", "distlib", *plan], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=child_environ(tmp_path), cwd=tmp_path)
    head = subprocess.run(["head", "-n", "1"], stdin=writer.stdout, capture_output=True,
                          text=True, timeout=120)
    assert writer.stdout is not None and writer.stderr is not None
    writer.stdout.close()
    try:
        assert writer.wait(timeout=120) in (0, BROKEN_PIPE_EXIT)
    finally:
        stderr = writer.stderr.read().decode()
        writer.stderr.close()
    assert head.stdout.split() == ["module", "device"]
    assert stderr == "", stderr
