"""Each rank's output as a user meets it: ``distlib launch`` and ``dl.launch`` with real ranks.

The console shows the ranks ``--ranks-filter`` names, each line ``[rank N] ``-prefixed;
``--log-dir`` keeps every rank's full output in ``rank_N.log``; a rank kept off the console
still has its traceback in the root-cause report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess
TIMEOUT = 180
ROOT = Path(__file__).resolve().parents[2]

# Each rank prints to both streams; rank 1 raises when asked to.
SCRIPT = textwrap.dedent("""
    import os, sys
    import distlib as dl
    env = dl.detect()
    print(f"out {env.rank} of {env.world_size}")
    print(f"err {env.rank}", file=sys.stderr)
    dl.main_print(env, "main only")
    if "--fail" in sys.argv and env.rank == 1:
        raise ValueError("rank 1 went wrong")
""")


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=TIMEOUT)


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    (cwd / "script.py").write_text(SCRIPT)
    return _run(["-m", "distlib", "launch", "--cpu", "--num-processes", "2", *args], cwd)


def _lines(text: str) -> list[str]:
    """The ranks' lines of a console stream (the launcher's own notes left out)."""
    return [line for line in text.splitlines() if not line.startswith("distlib launch:")]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_the_console_shows_the_filtered_rank_and_the_log_dir_keeps_every_rank(
        tmp_path: Path, method: str) -> None:
    done = _launch(["--start-method", method, "--log-dir", "logs", "--ranks-filter", "0",
                    "script.py"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert _lines(done.stdout) == ["[rank 0] out 0 of 2", "[rank 0] main only"]
    assert _lines(done.stderr) == ["[rank 0] err 0"]
    logs = tmp_path / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["rank_0.log", "rank_1.log"]
    assert sorted((logs / "rank_0.log").read_text().splitlines()) == [
        "err 0", "main only", "out 0 of 2"]
    assert sorted((logs / "rank_1.log").read_text().splitlines()) == ["err 1", "out 1 of 2"]
    note = (f"distlib launch: each rank's output also goes to {logs}{os.sep}rank_N.log; the "
            "console shows rank 0 only.")
    assert done.stderr.splitlines()[0] == note


def test_a_failing_rank_kept_off_the_console_still_reports_its_traceback(
        tmp_path: Path) -> None:
    done = _launch(["--ranks-filter", "0", "--log-dir", "logs", "--quiet", "script.py",
                    "--fail"], tmp_path)
    assert done.returncode == 1
    kept = (tmp_path / "logs" / "rank_1.log").read_text()
    assert kept.startswith(("out 1 of 2\nerr 1\n", "err 1\nout 1 of 2\n"))
    assert kept.endswith("ValueError: rank 1 went wrong\n")  # its traceback, at the end
    assert "[rank 1]" not in done.stdout + done.stderr
    assert not any(line.startswith("distlib launch: the console") for line in
                   done.stderr.splitlines())  # --quiet: no note
    report = done.stderr[done.stderr.index("distlib launch: rank 1 failed"):]
    assert "this is the root cause" in report
    assert 'raise ValueError("rank 1 went wrong")' in report
    assert report.rstrip().endswith("ValueError: rank 1 went wrong")
    program = _run(["-m", "distlib", "launch", "--cpu", "--num-processes", "2", "--log-dir",
                    "logs", "--ranks-filter", "0", "--no-python", "sh", "-c",
                    'echo "no disk on $RANK" >&2; exit $((RANK * 3))'], tmp_path)
    assert program.returncode == 3, program.stderr
    assert _lines(program.stderr)[0] == "[rank 0] no disk on 0"
    log = tmp_path / "logs" / "rank_1.log"
    assert f"see its log file {log})" in program.stderr
    assert log.read_text() == "no disk on 1\n"


def test_redirects_and_an_explicit_prefix(tmp_path: Path) -> None:
    hidden = _launch(["--log-dir", "logs", "--redirects", "3", "script.py"], tmp_path)
    assert hidden.returncode == 0, hidden.stderr
    assert _lines(hidden.stdout) == [] and _lines(hidden.stderr) == []
    assert "out 1 of 2" in (tmp_path / "logs" / "rank_1.log").read_text()
    prefixed = _launch(["--rank-prefix", "script.py"], tmp_path)
    assert prefixed.returncode == 0, prefixed.stderr
    assert sorted(_lines(prefixed.stdout)) == ["[rank 0] main only", "[rank 0] out 0 of 2",
                                               "[rank 1] out 1 of 2"]
    plain = _launch(["script.py"], tmp_path)  # the default: the ranks keep the terminal
    assert sorted(plain.stdout.splitlines()) == ["main only", "out 0 of 2", "out 1 of 2"]


PYTHON_API = textwrap.dedent("""
    import sys
    import distlib as dl
    from distlib.log import get_logger

    def train(tag):
        env = dl.detect()
        print(f"{tag} {env.rank}")
        dl.main_print(env, "main", tag)
        get_logger("user", env).warning("warned", main_process_only=False)
        return env.rank * 10

    if __name__ == "__main__":
        import logging
        logging.basicConfig(format="%(message)s")
        result = dl.launch(train, "fn", num_processes=2, cpu=True, timeout_s=120,
                           log_dir=sys.argv[1], ranks_filter=0)
        print("returned", list(result))
""")


def test_the_python_launch_takes_the_same_options(tmp_path: Path) -> None:
    (tmp_path / "user.py").write_text(PYTHON_API)
    done = _run(["user.py", str(tmp_path / "logs")], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[rank 0] fn 0", "[rank 0] main fn", "returned [0, 10]"]
    assert _lines(done.stderr)[-1] == "[rank 0] warned"  # the logger's own prefix, once
    assert done.stderr.splitlines()[0].startswith("launch(): each rank's output also goes to")
    assert sorted((tmp_path / "logs" / "rank_1.log").read_text().splitlines()) == [
        "[rank 1] warned", "fn 1"]
