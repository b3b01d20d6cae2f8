"""Launcher wall times: ``--help``, and a 2-process CPU job, distlib vs torchrun vs Accelerate.

1. ``distlib --help`` / ``distlib launch --help`` vs ``torchrun --help`` vs
   ``accelerate launch --help`` (and a check that distlib's help imports no torch).
2. A job that joins a gloo group (env://), does one all_reduce and exits, started by
   ``distlib launch --cpu --num-processes 2``, ``torchrun --nproc-per-node 2`` and
   ``accelerate launch --cpu --num_processes 2`` (which starts ONE process here: the table
   shows the world size each launcher really produced), plus one plain ``python job.py``.
   ``--start-method spawn`` shows distlib without forking ranks from the agent (fresh
   interpreters, as torchrun and GPU jobs do).
Launchers are interleaved run by run; the table shows medians and ratios to torchrun.
Target: distlib no slower than torchrun.
Run: python benchmarks/launch_time.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

JOB = """
import os, sys, time
import torch, torch.distributed as dist
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")
    t = torch.ones(1); dist.all_reduce(t)
    if dist.get_rank() == 0:
        open(os.environ["BENCH_OUT"], "w").write(str(dist.get_world_size()))
    dist.destroy_process_group()
else:
    open(os.environ["BENCH_OUT"], "w").write("1")
"""


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _time(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=600)
    return time.perf_counter() - start


def _table(title: str, rows: dict[str, list[float]], base: str,
           notes: dict[str, str]) -> None:
    print(f"\n{title}")
    ref = statistics.median(rows[base])
    print(f"{'launcher':<40} {'median s':>9} {'min s':>7} {'vs ' + base:>12}  note")
    for name, times in rows.items():
        med = statistics.median(times)
        print(f"{name:<40} {med:>9.2f} {min(times):>7.2f} {med / ref:>11.2f}x  "
              f"{notes.get(name, '')}")


def bench_help(repeats: int) -> None:
    env = dict(os.environ)
    commands = {"distlib --help": [_bin("distlib"), "--help"],
                "distlib launch --help": [_bin("distlib"), "launch", "--help"],
                "torchrun --help": [_bin("torchrun"), "--help"]}
    if shutil.which(_bin("accelerate")):
        commands["accelerate launch --help"] = [_bin("accelerate"), "launch", "--help"]
    rows: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            rows[name].append(_time(cmd, env))
    probe = ("import sys\nfrom distlib.cli import main\nfor a in (['--help'],"
             " ['launch', '--help']):\n    try: main(a)\n    except SystemExit: pass\n"
             "sys.stderr.write(str('torch' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stderr
    notes = {"distlib --help": f"imports torch: {out.strip()}"}
    _table("--help wall time", rows, "torchrun --help", notes)


def bench_job(repeats: int) -> None:
    work = tempfile.mkdtemp(prefix="distlib-bench-")
    job = os.path.join(work, "job.py")
    with open(job, "w") as handle:
        handle.write(JOB)
    out = os.path.join(work, "world")
    env = dict(os.environ, BENCH_OUT=out)
    env.pop("DISTLIB_CONFIG_FILE", None)
    env["XDG_CACHE_HOME"] = work  # no user config file changes distlib's run
    commands = {
        "distlib launch --cpu -n 2": lambda: [_bin("distlib"), "launch", "--cpu",
                                              "--num-processes", "2", job],
        "distlib launch ... --start-method spawn": lambda: [
            _bin("distlib"), "launch", "--cpu", "--num-processes", "2", "--start-method",
            "spawn", job],
        "torchrun --nproc-per-node 2": lambda: [_bin("torchrun"), "--nproc-per-node", "2",
                                                "--master-port", _port(), job],
        "accelerate launch --cpu -n 2": lambda: [_bin("accelerate"), "launch", "--cpu",
                                                 "--num_processes", "2", "--main_process_port",
                                                 _port(), job],
        "python job.py (1 process)": lambda: [sys.executable, job],
    }
    if not shutil.which(_bin("accelerate")):
        del commands["accelerate launch --cpu -n 2"]
    rows: dict[str, list[float]] = {name: [] for name in commands}
    worlds: dict[str, str] = {}
    for _ in range(repeats):
        for name, make in commands.items():
            rows[name].append(_time(make(), env))
            with open(out) as handle:
                worlds[name] = f"world size {handle.read()}"
    _table("2-process CPU job: join gloo group, one all_reduce, exit", rows,
           "torchrun --nproc-per-node 2", worlds)
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-help", action="store_true")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, medians of "
          f"{args.repeats} interleaved runs")
    if not args.skip_help:
        bench_help(args.repeats)
    bench_job(args.repeats)


if __name__ == "__main__":
    main()
