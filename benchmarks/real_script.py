"""A real training script under each launcher, with each tool's defaults: wall time as ratios.

The script is Accelerate's ``nlp_example`` (a tiny BERT on MRPC-like pairs, 3 epochs, offline)
in four spellings that train the same model on the same data:

- distlib's port, ``examples/accelerate/nlp_example.py``, under ``distlib launch --cpu
  --num-processes 2`` (fork start, the default; and ``--start-method spawn``) and under
  ``torchrun --nproc-per-node 2`` (detect() reads torchrun's variables);
- the Accelerate script (``benchmarks/peers/nlp_example_accelerate.py``) under torchrun, which is
  how Accelerate runs several local CPU ranks (``accelerate launch --cpu`` without MPI starts
  one process);
- raw torch (DistributedSampler + DDP, ``benchmarks/peers/nlp_example_torch.py``) under torchrun;
- Lightning Fabric (``benchmarks/peers/nlp_example_fabric.py``) under ``fabric run``;
- one plain process of distlib's port.

No thread count is pinned: each launcher's own default decides (the table shows the threads each
rank ended up with). Runs are interleaved; the table gives medians, the training-loop time each
script measured itself, the final loss and accuracy, and the ratio to raw torch under torchrun.
Target: distlib launch no slower than raw torch under torchrun.

Run: python benchmarks/real_script.py [--repeats 3] [--distlib-path OTHER_CHECKOUT]
(``--distlib-path`` adds a row for another checkout of distlib, e.g. an older commit, run with
the same interpreter: the before/after figure of a change.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from launch_time import _bin, _port  # this folder is the script's sys.path[0]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT_SCRIPT = os.path.join(ROOT, "examples", "accelerate", "nlp_example.py")
PEERS = os.path.join(ROOT, "benchmarks", "peers")


def _commands(distlib_path: str | None) -> dict[str, tuple[list[str], dict[str, str]]]:
    distlib = [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2"]
    torchrun = [_bin("torchrun"), "--nproc-per-node", "2", "--master-port"]
    rows: dict[str, tuple[list[str], dict[str, str]]] = {
        "distlib launch (fork, default)": ([*distlib, PORT_SCRIPT], {}),
        "distlib launch --start-method spawn": ([*distlib, "--start-method", "spawn",
                                                 PORT_SCRIPT], {}),
        "torchrun + distlib script": ([*torchrun, "PORT", PORT_SCRIPT, "--cpu"], {}),
        "torchrun + Accelerate script": ([*torchrun, "PORT", os.path.join(
            PEERS, "nlp_example_accelerate.py"), "--cpu"], {}),
        "torchrun + raw torch (DDP)": ([*torchrun, "PORT", os.path.join(
            PEERS, "nlp_example_torch.py")], {}),
        "fabric run (Lightning Fabric)": ([_bin("fabric"), "run", "--accelerator", "cpu",
                                           "--devices", "2", os.path.join(
                                               PEERS, "nlp_example_fabric.py")], {}),
        "python (1 process, distlib script)": ([sys.executable, PORT_SCRIPT, "--cpu"], {}),
    }
    if distlib_path:  # its own copy of the script where it has one (an older API)
        theirs = os.path.join(distlib_path, "examples", "accelerate", "nlp_example.py")
        rows[f"distlib launch from {distlib_path}"] = (
            [*distlib, theirs if os.path.exists(theirs) else PORT_SCRIPT],
            {"PYTHONPATH": os.path.abspath(distlib_path)})
    if not os.path.exists(_bin("fabric")):
        del rows["fabric run (Lightning Fabric)"]
    try:
        import accelerate  # noqa: F401
    except ImportError:
        del rows["torchrun + Accelerate script"]
    return rows


def _run(cmd: list[str], extra: dict[str, str], out: str, work: str) -> dict[str, float]:
    cmd = [_port() if part == "PORT" else part for part in cmd] + ["--output", out]
    env = dict(os.environ, XDG_CACHE_HOME=work, **extra)  # no user config file changes a run
    for name in ("DISTLIB_CONFIG_FILE", "OMP_NUM_THREADS"):
        env.pop(name, None)  # each tool's own default
    cwd = extra.get("PYTHONPATH", ROOT)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=900)
    wall = time.perf_counter() - start
    with open(out, encoding="utf-8") as handle:
        data = json.load(handle)
    os.remove(out)
    return {"wall": wall, "loop": data["seconds"], "loss": data["losses"][-1],
            "accuracy": data["metrics"][-1]["accuracy"], "threads": data["threads"],
            "world": data["world_size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--distlib-path", default=None,
                        help="another distlib checkout to time beside this one")
    args = parser.parse_args()
    commands = _commands(args.distlib_path)
    work = tempfile.mkdtemp(prefix="distlib-bench-")
    out = os.path.join(work, "result.json")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
    try:
        for _ in range(args.repeats):
            for name, (cmd, extra) in commands.items():
                results[name].append(_run(cmd, extra, out, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, nlp_example (3 epochs), "
          f"medians of {args.repeats} interleaved runs, no threads pinned")
    base = statistics.median(r["wall"] for r in results["torchrun + raw torch (DDP)"])
    head = (f"{'launcher + script':<40} {'wall s':>7} {'loop s':>7} {'vs torch':>9} "
            f"{'threads':>7} {'ranks':>5} {'loss':>7} {'acc':>6}")
    print(head)
    for name, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        loop = statistics.median(r["loop"] for r in runs)
        last = runs[-1]
        print(f"{name:<40} {wall:>7.2f} {loop:>7.2f} {wall / base:>8.2f}x {last['threads']:>7.0f}"
              f" {last['world']:>5.0f} {last['loss']:>7.4f} {last['accuracy']:>6.3f}")


if __name__ == "__main__":
    main()
