"""``distlib launch loud.py | head``: a reader that stops early ends the job quietly.

The ranks print into the launcher's stdout; when ``head`` has read its lines and gone, their
next write fails with a broken pipe (or, when the agent copies their output to the console,
the agent's does). That is no rank failure: the job ends with exit status 141 (a shell's for
SIGPIPE, as ``yes | head``) and nothing on stderr, restarts or not. A broken pipe of the
script's own (a pipe it opened) is still the root cause, traceback and all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distlib.cli import BROKEN_PIPE_EXIT
from tests.child_env import child_environ

pytestmark = pytest.mark.multiprocess
LIMIT = 120  # seconds any one launch may take here (each takes a few)

# rank 1 waits in a collective until rank 0 prints past the reader, as a training job would
LOUD = textwrap.dedent("""
    import os, sys, time
    import torch.distributed as dist
    import distlib as dl

    env = dl.detect()
    dl.barrier(env)
    if env.rank == 0 or sys.argv[1:] == ["everyone"]:
        for i in range(1_000_000):
            print(f"rank {env.rank} line {i}")
    dl.barrier(env)  # rank 1 waits here for rank 0, which the closed pipe ends
""")

# a broken pipe of the script's own making, while the console is fine
OWN_PIPE = textwrap.dedent("""
    import os
    read, write = os.pipe()
    os.close(read)
    os.write(write, b"nobody reads this")
""")


def _piped_into_head(tmp_path: Path, script: str, options: tuple[str, ...] = (),
                     script_args: tuple[str, ...] = ()) -> tuple[list[str], int, str]:
    """Run ``distlib launch --cpu --num-processes 2 OPTIONS SCRIPT ARGS | head -n 3``: head's
    lines, the launcher's exit status and its stderr."""
    path = tmp_path / "loud.py"
    path.write_text(script)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
         "--main-port", "0", *options, str(path), *script_args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=child_environ(tmp_path), cwd=tmp_path)
    assert launcher.stdout is not None and launcher.stderr is not None
    head = subprocess.run(["head", "-n", "3"], stdin=launcher.stdout, capture_output=True,
                          text=True, timeout=LIMIT)
    launcher.stdout.close()  # only head holds the read end: once it exits, nobody reads
    try:
        code = launcher.wait(timeout=LIMIT)
    finally:
        stderr = launcher.stderr.read().decode()
        launcher.stderr.close()
    return head.stdout.splitlines(), code, stderr


@pytest.mark.parametrize("options", [
    (), ("--max-restarts", "2"), ("--start-method", "spawn"),
    ("--rank-prefix",),  # the agent copies the output (the ranks write to files)
    ("--rank-prefix", "--max-restarts", "2", "--start-method", "spawn")],
    ids=["fork", "restarts", "spawn", "captured", "captured-restarts-spawn"])
def test_a_closed_pipe_ends_the_launch_quietly(tmp_path: Path, options: tuple[str, ...]) -> None:
    start = time.monotonic()
    lines, code, stderr = _piped_into_head(tmp_path, LOUD, options)
    head = "[rank 0] " if "--rank-prefix" in options else ""
    assert lines == [f"{head}rank 0 line {i}" for i in range(3)]
    assert code == BROKEN_PIPE_EXIT, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert "restarting" not in stderr and "root cause" not in stderr, stderr
    assert stderr == "", stderr
    # it ends when the reader goes: rank 0 would print a million lines, rank 1 wait for it
    assert time.monotonic() - start < LIMIT / 2


def test_every_rank_printing_into_the_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    lines, code, stderr = _piped_into_head(tmp_path, LOUD, script_args=("everyone",))
    assert len(lines) == 3 and all(line.startswith("rank ") for line in lines)
    assert (code, stderr) == (BROKEN_PIPE_EXIT, "")


def test_a_broken_pipe_of_the_scripts_own_is_the_root_cause(tmp_path: Path) -> None:
    lines, code, stderr = _piped_into_head(tmp_path, OWN_PIPE)
    assert lines == [] and code == 1
    assert "this is the root cause" in stderr, stderr
    assert "BrokenPipeError" in stderr and 'os.write(write, b"nobody reads this")' in stderr


def _closed(stdout: int | None, tmp_path: Path) -> str:
    """What `console_closed` says in a child whose stdout is ``stdout`` (stderr: a file)."""
    code = ("import sys\nfrom distlib.launcher._bootstrap import console_closed\n"
            "sys.stderr.write(str(console_closed()))\n")
    with open(tmp_path / "err", "w+") as err:
        subprocess.run([sys.executable, "-c", code], stdout=stdout, stderr=err, timeout=LIMIT,
                       env=child_environ(tmp_path), check=True)
        err.seek(0)
        return err.read()


def test_console_closed_tells_a_widowed_pipe_from_a_live_one(tmp_path: Path) -> None:
    read, write = os.pipe()
    try:
        assert _closed(write, tmp_path) == "False"  # a live pipe
        os.close(read)
        read = -1
        assert _closed(write, tmp_path) == "True"  # its reader is gone
    finally:
        os.close(write)
        if read >= 0:
            os.close(read)
    assert _closed(subprocess.DEVNULL, tmp_path) == "False"
    with open(tmp_path / "out", "w") as out:
        assert _closed(out.fileno(), tmp_path) == "False"  # a file
