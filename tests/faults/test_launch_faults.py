"""Launch faults with real processes: every report line names its cause (issue 12, items 5-8, 10).

Each test runs ``distlib launch`` (2 gloo ranks on 127.0.0.1, short timeouts) on one script,
``faults.py``, whose first argument picks the fault:

- ``kill``: rank 1 SIGKILLs itself after a collective (the OOM killer's signal); the report
  names rank 1 and the signal, and not "another machine" (item 5).
- ``finish``: rank 0 waits in an all_reduce rank 1 never joins, and rank 1's script returns;
  rank 0 must be released at once (not after the collective timeout), under fork and spawn,
  and the report names the finished rank and the collective rank 0 waited in (item 6).
- ``attempts``: with --max-restarts, one line per failed attempt, and the last attempt's
  root cause (a signal, where the first attempt raised) (item 8).
- ``hang``: rank 1 sleeps while rank 0 waits in an all_reduce (``hang-distlib``: in
  ``distlib.reduce``); --stall-timeout, --timeout and ``launch(timeout_s=)`` each end the job
  with each rank's place (item 7); a TimeoutError of the script's own is no hang.
- a busy main port is refused by name (item 10, launcher side).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from distlib.errors import LaunchError

pytestmark = pytest.mark.multiprocess
LIMIT = 90  # seconds any one launch may take here (each takes a few)

FAULTS = textwrap.dedent("""
    import os, signal, sys, time
    import torch, torch.distributed as dist
    import distlib
    from distlib import runtime
    env = distlib.detect()
    fault = sys.argv[1]
    open(os.path.join(os.environ["OUT"], "pid%d-%d" % (env.rank, os.getpid())), "w").close()
    runtime.initialize(env)
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.all_reduce(t)
    if fault == "kill" and env.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "finish":
        if env.rank == 0:
            dist.all_reduce(t)  # FINISH-LINE: rank 1 never joins this one
        sys.exit(0)
    if fault == "attempts":
        plan = sys.argv[2].split(",")[env.restart_count]
        if plan == "raise" and env.rank == 1:
            raise ValueError("boom in attempt %d" % env.restart_count)
        if plan == "kill" and env.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()
        sys.exit(0)
    if fault == "hang":
        if env.rank == 0:
            dist.all_reduce(t)  # WAIT-LINE
        else:
            time.sleep(600)  # SLEEP-LINE
    if fault == "hang-distlib":  # in distlib's own collective: the user's line is named
        if env.rank == 0:
            distlib.reduce(t, env)  # DISTLIB-LINE
        else:
            time.sleep(600)
    if fault == "user-timeout" and env.rank == 1:
        raise TimeoutError("the script's own request timed out")
    dist.barrier()
""")


def _line(marker: str) -> int:
    return next(i for i, text in enumerate(FAULTS.splitlines(), 1) if marker in text)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "faults.py").write_text(FAULTS)
    return tmp_path


def _start(work: Path, *args: str, tag: str = "") -> subprocess.Popen[str]:
    out = work / (tag or "out")
    out.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "distlib", "launch", "--cpu",
                             "--num-processes", "2", *args], cwd=work, text=True,
                            env=dict(os.environ, OUT=str(out)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[str], start: float) -> tuple[int, str, float]:
    _, err = proc.communicate(timeout=LIMIT)
    return proc.returncode, err, time.monotonic() - start


def _no_rank_left(out: Path) -> None:
    pids = [int(p.name.split("-")[1]) for p in out.glob("pid*")]
    assert pids, "the ranks never started"
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)],
                                 timeout=10)
    assert alive == [], [p.pid for p in alive]


def test_a_rank_killed_by_a_signal_is_named_under_fork_and_spawn(work: Path) -> None:
    start = time.monotonic()
    procs = {m: _start(work, "--start-method", m, "faults.py", "kill", tag=m)
             for m in ("fork", "spawn")}
    for method, proc in procs.items():
        code, err, elapsed = _finish(proc, start)
        assert code != 0, (method, err)
        assert "rank 1 was killed by signal 9 (SIGKILL) — out of memory? (see `dmesg`)" in err, (
            method, err)
        assert "this is the root cause" in err and "another machine" not in err, (method, err)
        assert elapsed < 60, (method, elapsed)
        _no_rank_left(work / method)


def test_a_finished_rank_releases_a_peer_waiting_in_a_collective_it_never_joins(
        work: Path) -> None:
    start = time.monotonic()  # --timeout 600: only the release can end this within LIMIT
    procs = {m: _start(work, "--start-method", m, "--timeout", "600", "faults.py", "finish",
                       tag=m) for m in ("fork", "spawn")}
    for method, proc in procs.items():
        code, err, elapsed = _finish(proc, start)
        assert code == 1, (method, err)
        assert (f"rank 1 had finished (its target returned) while rank 0 still waited in "
                f"all_reduce at faults.py:{_line('FINISH-LINE')}, which rank 1 never joined"
                in err), (method, err)
        assert "another machine" not in err
        assert elapsed < 60, (method, elapsed)
        _no_rank_left(work / method)


CLOSE = textwrap.dedent("""
    import atexit, os, sys
    import torch, torch.distributed as dist
    import distlib
    from distlib import runtime
    env = distlib.detect()
    out = os.environ["OUT"]
    destroy = dist.destroy_process_group
    def spy(*args, **kwargs):  # the launcher's close, after the script's own atexit handler
        seen = os.path.exists(os.path.join(out, "user%d" % env.rank))
        open(os.path.join(out, "closed%d" % env.rank), "w").write("after-user" if seen else "before")
        return destroy(*args, **kwargs)
    dist.destroy_process_group = spy
    atexit.register(lambda: open(os.path.join(out, "user%d" % env.rank), "w").close())
    runtime.initialize(env)
    dist.all_reduce(torch.ones(1))
    if sys.argv[1] == "fail" and env.rank == 1:
        raise ValueError("rank 1 fails")
""")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_finished_rank_closes_its_process_group_after_the_scripts_own_exit_handlers(
        work: Path, method: str) -> None:
    # torch's gloo group left open at exit aborts a process now and then (SIGABRT in the
    # interpreter's teardown): a finished rank's group is closed, after the script's atexit
    (work / "close.py").write_text(CLOSE)
    start = time.monotonic()
    code, err, _ = _finish(_start(work, "--start-method", method, "close.py", "ok",
                                  tag="ok"), start)
    assert code == 0, err
    assert [(work / "ok" / f"closed{r}").read_text() for r in (0, 1)] == ["after-user"] * 2
    code, err, _ = _finish(_start(work, "--start-method", method, "close.py", "fail",
                                  tag="fail"), start)
    assert code == 1 and "ValueError: rank 1 fails" in err, err
    assert not (work / "fail" / "closed1").exists()  # a failed rank's group is left alone


def test_restarts_print_each_failed_attempt_and_report_the_last(work: Path) -> None:
    start = time.monotonic()
    fixed = _start(work, "--max-restarts", "2", "faults.py", "attempts", "raise,kill,ok",
                   tag="fixed")
    failed = _start(work, "--max-restarts", "1", "faults.py", "attempts", "raise,kill",
                    tag="failed")
    code, err, _ = _finish(fixed, start)
    assert code == 0, err  # fixed by the second restart, and still each failure is printed
    assert ("distlib launch: attempt 1 of 3 failed: rank 1 raised ValueError: boom in "
            "attempt 0; restarting (2 restarts left)") in err, err
    assert ("distlib launch: attempt 2 of 3 failed: rank 1 was killed by signal 9 (SIGKILL); "
            "restarting (1 restart left)") in err, err
    code, err, elapsed = _finish(failed, start)
    assert code == 1, err
    lines = err.splitlines()
    assert "distlib launch: attempt 1 of 2 failed: rank 1 raised ValueError: boom in attempt 0" in lines
    assert "distlib launch: attempt 2 of 2 failed: rank 1 was killed by signal 9 (SIGKILL)" in lines
    # the root cause is the last attempt's (the signal), not attempt 1's traceback
    assert "distlib launch: rank 1 was killed by signal 9 (SIGKILL)" in err
    assert "Traceback (most recent call last)" not in err, err
    assert elapsed < 80, elapsed


def _hang_lines(err: str, state0: str) -> None:
    wait, sleep = _line("WAIT-LINE"), _line("SLEEP-LINE")
    state = rf" \({re.escape(state0)}" if state0 else "\n"
    assert re.search(rf"  rank 0: faults\.py:{wait} waiting in all_reduce{state}", err), err
    assert (f"  rank 1: faults.py:{sleep} in <module>: time.sleep(600)  # SLEEP-LINE "
            "(not in a collective") in err, err
    assert "not in a collective while others wait: rank 1 (the likely cause)" in err, err
    assert f'faults.py", line {sleep}, in <module>' in err  # rank 1's own stack


def test_a_stall_or_a_timeout_reports_where_each_rank_is(work: Path) -> None:
    start = time.monotonic()
    stall = _start(work, "--stall-timeout", "2", "faults.py", "hang", tag="stall")
    code, err, elapsed = _finish(stall, start)
    assert code != 0, err
    assert ("distlib launch: rank 0 made no progress in a collective for 2.0 s (the stall "
            "timeout); every rank was stopped.") in err, err
    _hang_lines(err, "collective #3; no progress for 2.0 s")  # two all_reduces done before
    assert "(not in a collective; 2 collectives done)" in err
    assert elapsed < 45, elapsed
    _no_rank_left(work / "stall")

    start = time.monotonic()
    mine = _start(work, "--stall-timeout", "2", "faults.py", "hang-distlib", tag="in-distlib")
    code, err, elapsed = _finish(mine, start)
    assert code != 0, err
    assert re.search(rf"  rank 0: faults\.py:{_line('DISTLIB-LINE')} waiting in \w+ "
                     r"\(collective #\d+; no progress for 2\.0 s\)", err), err
    assert "not in a collective while others wait: rank 1 (the likely cause)" in err, err
    assert elapsed < 45, elapsed

    start = time.monotonic()
    timeout = _start(work, "--timeout", "3", "faults.py", "hang", tag="timeout")
    code, err, elapsed = _finish(timeout, start)
    assert code != 0, err
    assert "distlib launch: rank 0 timed out waiting in all_reduce; a timeout is a hang" in err
    _hang_lines(err, "timed out")
    assert "Timed out waiting 3000ms" in err  # rank 0's own error, after the places
    assert elapsed < 45, elapsed
    _no_rank_left(work / "timeout")


def test_a_timeout_in_the_scripts_own_code_is_an_ordinary_failure(work: Path) -> None:
    proc = _start(work, "faults.py", "user-timeout")
    code, err, _ = _finish(proc, time.monotonic())
    assert code == 1, err
    assert "distlib launch: rank 1 failed with exit code 1; this is the root cause" in err, err
    assert "TimeoutError: the script's own request timed out" in err
    assert "Where each rank was" not in err


def test_launch_timeout_s_reports_where_each_rank_is(work: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from distlib.launcher.launcher import launch

    out = work / "api"
    out.mkdir()
    environ = dict(os.environ, OUT=str(out))
    start = time.monotonic()
    with pytest.raises(LaunchError) as caught:
        launch(str(work / "faults.py"), "hang", num_processes=2, cpu=True, timeout_s=8,
               environ=environ)
    err = str(caught.value)
    assert "launch(): the job must finish within timeout_s=8, but it was still running" in err
    _hang_lines(err, "")
    assert time.monotonic() - start < 45
    _no_rank_left(out)


def test_a_busy_main_port_is_named(work: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _start(work, "--main-port", str(port), "faults.py", "kill")
        code, err, _ = _finish(proc, time.monotonic())
        assert code == 2, err
        assert (f"port {port} on 127.0.0.1 is in use; pick another or use 0 (a free port)"
                in err), err
        assert "Traceback" not in err

        # The same port taken between the check and the agent's bind: the agent names it too.
        from distlib.launcher._environ import child_environ
        from distlib.launcher.launcher import run_plan
        from distlib.launcher.plan import LaunchPlan

        plan = LaunchPlan(nproc_per_node=2, cpu=True, main_port=port)
        command = [sys.executable, "-u", "-m", "distlib.launcher._bootstrap", "script",
                   str(work / "faults.py"), "kill"]
        outcome = run_plan(plan, command, environ=child_environ(os.environ, plan),
                           work_dir=str(work), timeout_s=LIMIT)
    assert not outcome.ok
    assert f"port {port} on 127.0.0.1 is in use; pick another or use 0" in outcome.error
