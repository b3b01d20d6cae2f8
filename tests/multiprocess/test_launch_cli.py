"""``distlib launch`` / ``distlib test`` as a user runs them: real processes, gloo, 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from distlib.testing import free_port

pytestmark = pytest.mark.multiprocess
TIMEOUT = 180

# A script that joins the group, all_reduces, and writes what its rank saw to OUT/rank<r>.json.
REPORT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    import distlib
    from distlib import runtime
    import atexit
    env = distlib.detect()
    atexit.register(lambda: open(os.path.join(os.environ["OUT"], "exit%d" % env.rank), "w"))
    runtime.initialize(env)
    total = torch.tensor([float(env.rank)])
    dist.all_reduce(total)
    out = {"rank": env.rank, "world": env.world_size, "local": env.local_rank,
           "node": env.node_rank, "sum": total.item(), "argv": sys.argv[1:],
           "precision": str(env.precision), "strategy": env.strategy.name,
           "launcher": env.launcher, "restart": env.restart_count, "pid": os.getpid()}
    if "--fail-rank" in sys.argv and env.rank == int(sys.argv[-1]):
        raise ZeroDivisionError("rank %d divides by zero" % env.rank)
    if "--hang" in sys.argv:
        open(os.path.join(os.environ["OUT"], "pid%d" % os.getpid()), "w").close()
        import time; time.sleep(600)
    dist.barrier()
    with open(os.path.join(os.environ["OUT"], "rank%d.json" % env.rank), "w") as f:
        json.dump(out, f)
    runtime.shutdown()
""")


def _cli(args: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OUT=str(cwd), **extra)
    return subprocess.run([sys.executable, "-m", "distlib", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def _reports(directory: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in directory.glob("rank*.json")}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "report.py").write_text(REPORT)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "report.py").write_text(REPORT)
    return tmp_path


def test_script_with_cpu_flag_starts_two_ranks_and_passes_settings(work: Path) -> None:
    done = _cli(["launch", "--cpu", "--num_processes", "2", "--precision", "bf16",
                 "--strategy", "fsdp", "--fsdp-cpu-offload", "report.py", "--lr", "3"], work)
    assert done.returncode == 0, done.stderr
    reports = _reports(work)
    assert sorted(reports) == [0, 1]
    for rank, got in reports.items():
        assert (got["world"], got["local"], got["sum"]) == (2, rank, 1.0)
        assert got["argv"] == ["--lr", "3"] and got["launcher"] == "distlib"
        assert (got["precision"], got["strategy"]) == ("bf16", "fsdp")
        assert (work / f"exit{rank}").exists()  # the script's atexit handlers ran


def test_module_launch_reads_an_accelerate_config(work: Path) -> None:
    config = work / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\n"
                      "mixed_precision: bf16\nnum_processes: 2\nuse_cpu: true\n"
                      "machine_rank: 0\nnum_machines: 1\nrdzv_backend: static\n"
                      "main_training_function: main\nsame_network: true\n")
    done = _cli(["launch", "--config-file", str(config), "--start-method", "spawn",
                 "--strategy", "fsdp", "-m", "pkg.report", "x"], work)
    assert done.returncode == 0, done.stderr
    reports = _reports(work)
    assert sorted(reports) == [0, 1] and reports[1]["precision"] == "bf16"  # from the file
    assert reports[1]["strategy"] == "fsdp"  # the flag beats the file's MULTI_CPU (ddp)
    assert reports[0]["argv"] == ["x"]
    assert (work / "exit0").exists()


def test_a_raising_rank_ends_the_job_with_its_traceback_once(work: Path) -> None:
    start = time.monotonic()
    done = _cli(["launch", "--cpu", "--num-processes", "2", "report.py", "--fail-rank", "1"],
                work)
    elapsed = time.monotonic() - start
    assert done.returncode == 1
    assert "rank 1 failed" in done.stderr and "root cause" in done.stderr
    assert "ZeroDivisionError: rank 1 divides by zero" in done.stderr
    assert done.stderr.count("Traceback (most recent call last)") == 1
    assert "report.py" in done.stderr and "_bootstrap" not in done.stderr
    assert _reports(work) == {}  # rank 0 was stopped in its barrier
    assert elapsed < 90, elapsed


def test_sigterm_to_the_launcher_stops_every_rank(work: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "distlib", "launch", "--cpu",
                             "--num-processes", "2", "report.py", "--hang"], cwd=work,
                            env=dict(os.environ, OUT=str(work)), stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + TIMEOUT
    while len(list(work.glob("pid*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = [int(p.name[3:]) for p in work.glob("pid*")]
    assert len(pids) == 2
    launcher = psutil.Process(proc.pid)
    family = [launcher.pid] + [c.pid for c in launcher.children(recursive=True)]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    _, alive = psutil.wait_procs([psutil.Process(p) for p in family if psutil.pid_exists(p)],
                                    timeout=30)
    assert alive == [], [p.pid for p in alive]
    assert not any(psutil.pid_exists(p) for p in pids)
    assert "stopped" in err


RESUME = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    import distlib
    from distlib import runtime
    env = distlib.detect()
    runtime.initialize(env)
    ckpt = os.path.join(os.environ["OUT"], "step%d" % env.rank)
    step = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
    for step in range(step, 4):
        t = torch.tensor([1.0]); dist.all_reduce(t)
        open(ckpt, "w").write(str(step + 1))
        if step == 1 and env.restart_count == 0 and env.rank == 1:
            raise RuntimeError("crash after step 2")
    open(os.path.join(os.environ["OUT"], "done%d" % env.rank), "w").write(
        "%d %d" % (env.restart_count, step))
    runtime.shutdown()
""")


def test_max_restarts_restarts_the_group_and_a_checkpointing_script_resumes(work: Path) -> None:
    (work / "resume.py").write_text(RESUME)
    done = _cli(["launch", "--cpu", "--num-processes", "2", "--max-restarts", "1",
                 "resume.py"], work)
    assert done.returncode == 0, done.stderr
    for rank in range(2):
        assert (work / f"done{rank}").read_text() == "1 3"  # attempt 1 finished step 4


def _two_machines(work: Path, *script: str) -> list[subprocess.Popen[str]]:
    port = str(free_port())
    common = ["launch", "--cpu", "--num-machines", "2", "--num-processes", "4",
              "--rdzv-backend", "c10d", "--main-address", "127.0.0.1", "--main-port", port]
    return [subprocess.Popen([sys.executable, "-m", "distlib", *common, "--machine-rank",
                              str(rank), *script], cwd=work, text=True,
                             env=dict(os.environ, OUT=str(work)), stderr=subprocess.PIPE)
            for rank in range(2)]


def test_two_invocations_form_one_world_of_four(work: Path) -> None:
    procs = _two_machines(work, "report.py")
    errors = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    reports = _reports(work)
    assert sorted(reports) == [0, 1, 2, 3]
    assert {r["world"] for r in reports.values()} == {4}
    assert {r["sum"] for r in reports.values()} == {6.0}
    assert sorted((r["node"], r["local"]) for r in reports.values()) == [
        (0, 0), (0, 1), (1, 0), (1, 1)]


def test_a_raising_rank_on_one_machine_ends_both(work: Path) -> None:
    start = time.monotonic()
    procs = _two_machines(work, "report.py", "--fail-rank", "3")
    errors = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    assert all(p.returncode != 0 for p in procs), errors
    assert sum("rank 3 divides by zero" in e for e in errors) == 1
    assert sum("root cause is on another machine" in e for e in errors) <= 1
    assert time.monotonic() - start < 120


CHECKS = textwrap.dedent("""
    def broken(env):
        raise AssertionError("checksum mismatch on rank %d" % env.rank)

    def fine(env):
        return "fine"
""")


def _python_path(*first: Path) -> str:
    """``first``, then the PYTHONPATH this test runs with (the checkout under test)."""
    return os.pathsep.join([*map(str, first), *filter(None, [os.environ.get("PYTHONPATH")])])


def test_distlib_test_passes_and_fails_when_a_check_breaks(work: Path) -> None:
    (work / "extra_checks.py").write_text(CHECKS)
    extra = {"PYTHONPATH": _python_path(work)}
    done = _cli(["test", "--cpu", "--num-processes", "2", "--check", "extra_checks:fine"],
                work, **extra)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    from distlib.cli.test import CHECKS as BUILT_IN

    assert lines[-1] == f"distlib test: PASSED (2 ranks, {len(BUILT_IN) + 1} checks each)"
    assert any(line.split()[:3] == ["1", "2", "1"] for line in lines)
    assert "all_reduce" in done.stdout and "broadcast" in done.stdout
    done = _cli(["test", "--cpu", "--num-processes", "2", "--check", "extra_checks:broken"],
                work, **extra)
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1].startswith("distlib test: FAILED")
    assert "checksum mismatch on rank 1" in done.stdout


# Every Python process of the test loads this (it is first on PYTHONPATH): the public
# gather_metrics drops its last row, as a broken deduplication would.
BROKEN_GATHER_METRICS = textwrap.dedent("""
    import importlib
    import distlib

    def gather_metrics(x, env, loader):
        module = importlib.import_module(distlib._EXPORTS["gather_metrics"])
        return module.gather_metrics(x, env, loader)[:-1]

    distlib.gather_metrics = gather_metrics
""")


def test_distlib_test_fails_on_a_broken_check_under_python_optimize(work: Path) -> None:
    """``python -O`` with PYTHONOPTIMIZE (which the ranks inherit) strips every ``assert``:
    the built-in checks must still fail, naming the check and what differed."""
    broken = work / "broken"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text(BROKEN_GATHER_METRICS)
    env = dict(os.environ, PYTHONOPTIMIZE="1", PYTHONPATH=_python_path(broken))
    command = [sys.executable, "-O", "-m", "distlib", "test", "--cpu", "--num-processes", "2"]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "distlib test: FAILED (2 failed checks)"
    for rank in (0, 1):
        assert (f"rank {rank} distlib.cli._checks:check_sharded_loader: ShardingError: "
                "distlib test sharded_loader: the map dataset gathered by gather_metrics must "
                "be 0..12 in order") in done.stdout
    healthy = dict(env, PYTHONPATH=_python_path())
    done = subprocess.run(command, cwd=work, env=healthy, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("distlib test: PASSED (2 ranks")


def test_no_python_runs_a_program_per_rank(work: Path) -> None:
    done = _cli(["launch", "--cpu", "--num-processes", "2", "--no-python", "sh", "-c",
                 'echo "$RANK $WORLD_SIZE $DISTLIB_LAUNCHED" > "$OUT/nopy$RANK"'], work)
    assert done.returncode == 0, done.stderr
    assert [(work / f"nopy{r}").read_text().split() for r in range(2)] == [
        ["0", "2", "1"], ["1", "2", "1"]]
    failed = _cli(["launch", "--cpu", "--num-processes", "2", "--no-python", "sh", "-c",
                   'exit $((RANK + 3))'], work)
    assert failed.returncode in (3, 4) and "without a Python traceback" in failed.stderr


def test_ranks_read_the_launchers_stdin(work: Path) -> None:
    (work / "echo.py").write_text("import sys\nprint('got', sys.stdin.readline().strip())\n")
    for method in ("fork", "spawn"):  # a breakpoint() in a rank needs the terminal's stdin
        done = subprocess.run([sys.executable, "-m", "distlib", "launch", "--cpu",
                               "--start-method", method, "echo.py"], cwd=work, input="hi\n",
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert done.stdout.split() == ["got", "hi"], (method, done.stderr)


# Every rank clips by the norm of its own shards only (the norm is not reduced over the mesh),
# as a clip_grad_norm that forgot DTensors would: the ranks step differently from one process.
BROKEN_CLIP_GRAD_NORM = textwrap.dedent("""
    import torch
    import distlib

    def clip_grad_norm(model, max_norm):
        grads = [getattr(p.grad, "_local_tensor", p.grad) for p in model.parameters()
                 if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        for g in grads:
            g.mul_(min(1.0, max_norm / (float(norm) + 1e-6)))
        return norm

    distlib.clip_grad_norm = clip_grad_norm
""")


def _rows(stdout: str, column: str) -> dict[int, str]:
    """The ``column`` cell of each rank's row of the ``distlib test`` table."""
    lines = stdout.splitlines()
    header = next(line.split() for line in lines if line.split()[:2] == ["rank", "world"])
    rows = [line.split() for line in lines if line.split()[:1] and line.split()[0].isdigit()]
    return {int(row[0]): row[header.index(column)] for row in rows if len(row) == len(header)}


def test_distlib_test_checks_a_tensor_parallel_mesh_and_fails_a_broken_clip(work: Path) -> None:
    command = ["test", "--cpu", "--num-processes", "4", "--tp-size", "2"]
    done = _cli(command, work, PYTHONPATH=_python_path())
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("distlib test: PASSED (4 ranks")
    assert _rows(done.stdout, "mesh") == dict.fromkeys(range(4), "ok")
    assert _rows(done.stdout, "strategy") == dict.fromkeys(range(4), "fsdp")  # picked for tp
    details = [line.split(None, 1)[1] for line in done.stdout.splitlines()
               if line.startswith("  mesh ")]
    assert len(details) == 1 and details[0].startswith("ranks 0-3: mesh dp_shard=2 x tp=2 (")
    assert "4 steps match 1 process" in details[0]
    broken = work / "broken"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text(BROKEN_CLIP_GRAD_NORM)
    done = _cli(command, work, PYTHONPATH=_python_path(broken))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("distlib test: FAILED")
    assert _rows(done.stdout, "mesh") == dict.fromkeys(range(4), "FAIL")
    for rank in range(4):
        assert (f"rank {rank} distlib.cli._checks:check_mesh: StrategyError: distlib test mesh: "
                "the largest relative loss difference of mesh dp_shard=2 x tp=2 (") in done.stdout
    # transformers is a test extra, not a dependency: without it the check trains its MLP.
    missing = work / "no_transformers"
    missing.mkdir()
    (missing / "sitecustomize.py").write_text("import sys\nsys.modules['transformers'] = None\n")
    done = _cli(command, work, PYTHONPATH=_python_path(missing))
    assert done.returncode == 0, done.stdout + done.stderr
    assert _rows(done.stdout, "mesh") == dict.fromkeys(range(4), "ok")
    assert ("  mesh            ranks 0-3: mesh dp_shard=2 x tp=2 (mlp, fsdp/no): 4 steps match 1 "
            "process") in done.stdout
