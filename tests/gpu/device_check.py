"""The GPU proof kit's driver: tests, a user-shaped run and benchmarks, one JSON summary.

Run it through ``tests/gpu/device_check.sh`` (which sets ``PYTHONPATH``). Phases, each in its own
subprocess with its own time limit, all inside ``--budget-s`` (default 480 s):

1. ``info``: python, torch, CUDA, the GPU, the optional packages found;
2. ``pytest``: ``pytest tests/gpu`` (junit XML parsed into passed / failed / skipped, with the
   failures' messages);
3. ``example``: ``python -m distlib launch --num-processes 1 examples/train.py --precision bf16
   --quick``, as a user runs it;
4. ``bench_*``: ``benchmarks/gpu_load.py``, ``gpu_generate.py``, ``gpu_train.py`` (their JSON).

Everything lands in ``$OUT`` (or ``--out``): ``summary.json`` and one log per phase; the summary
is printed last. Without CUDA the phases become the dry run: the GPU tests must collect and each
benchmark must pass ``--dry-run`` on the CPU; it says ``no CUDA: skipped`` and exits 0 when they
do. Exit code: 0 when every phase that ran passed, else 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ("gpu_load", "gpu_generate", "gpu_train")
OPTIONAL = ("cloudpickle", "torchao", "transformers", "accelerate", "safetensors", "deepspeed",
            "hypothesis", "psutil", "tqdm", "yaml")


class Clock:
    """The time left of the whole run."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


def _run(name: str, command: list[str], out: Path, limit_s: float,
         env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one phase; its output goes to ``out/name.log``. Returns rc, seconds, the log's tail."""
    log = out / f"{name}.log"
    start = time.monotonic()
    if limit_s < 5:
        return {"status": "not run: out of time", "seconds": 0}
    with open(log, "wb") as handle:
        try:
            proc = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=limit_s, env=env)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = round(time.monotonic() - start, 1)
    tail = log.read_text(errors="replace")[-1500:]
    status = "timed out" if rc is None else ("passed" if rc == 0 else f"failed (rc {rc})")
    return {"status": status, "seconds": seconds, "log": str(log), "tail": tail if rc else ""}


def _info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "cwd": str(ROOT)}
    try:
        import torch
    except ImportError as error:
        info["torch"] = f"not importable: {error}"
        info["cuda"] = False
        return info
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "capability": list(torch.cuda.get_device_capability(0)),
                       "count": torch.cuda.device_count(),
                       "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    info["packages"] = {name: _version(name) for name in OPTIONAL}
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rev = ""
    info["git"] = rev or "unknown"
    return info


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "missing"
    try:
        mod = __import__(module)
    except Exception as error:  # a broken optional package is a finding, not a crash
        return f"broken: {type(error).__name__}: {error}"[:200]
    return str(getattr(mod, "__version__", "present"))


def _junit(path: Path) -> dict[str, Any]:
    """passed / failed / skipped counts and each failure's test and first message line."""
    if not path.exists():
        return {"error": "no junit xml written"}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures: list[dict[str, str]] = []
    skips: dict[str, int] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            counts["failed"] += 1
            failures.append({"test": name, "message": (bad.get("message") or "")[:400]})
        elif skipped is not None:
            counts["skipped"] += 1
            reason = (skipped.get("message") or "")[:120]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skip_reasons": skips}


def _pytest(out: Path, clock: Clock, cuda: bool) -> dict[str, Any]:
    xml = out / "pytest.xml"
    if cuda:
        args = ["tests/gpu", "-v", "-p", "no:cacheprovider", f"--junitxml={xml}",
                "-o", "addopts="]
        if importlib.util.find_spec("pytest_timeout") is not None:
            args.append("--timeout=240")  # one hung test must not eat the whole visit
    else:  # the dry run: the GPU tests must still import and collect
        args = ["tests/gpu", "--collect-only", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    phase = _run("pytest", [sys.executable, "-m", "pytest", *args], out,
                 min(clock.left() - 150 if cuda else clock.left(), 300))
    if cuda:
        phase["tests"] = _junit(xml)
    else:
        text = (out / "pytest.log").read_text(errors="replace")
        phase["collected"] = next((line for line in text.splitlines()
                                   if "tests collected" in line or "test collected" in line), "")
    return phase


def _example(out: Path, clock: Clock) -> dict[str, Any]:
    command = [sys.executable, "-m", "distlib", "launch", "--num-processes", "1",
               "examples/train.py", "--precision", "bf16", "--quick"]
    phase = _run("example", command, out, min(clock.left() - 120, 120))
    phase["command"] = " ".join(command[1:])
    return phase


def _bench(name: str, out: Path, clock: Clock, cuda: bool, share: float) -> dict[str, Any]:
    result_path = out / f"{name}.json"
    command = [sys.executable, f"benchmarks/{name}.py", "--json", str(result_path)]
    if not cuda:
        command.append("--dry-run")
    work = out / f"{name}-work"
    command += ["--folder", str(work)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    phase = _run(f"bench_{name}", command, out, min(clock.left() * share, 240), env=env)
    if result_path.exists():
        phase["result"] = json.loads(result_path.read_text())
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return phase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or None,
                        help="folder for summary.json and logs (default: $OUT, else a temp dir)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds for everything (default 480)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="phases to run: pytest example " + " ".join(BENCHMARKS))
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="distlib-device-check-"))
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget_s)
    started = time.monotonic()
    info = _info()
    cuda = bool(info.get("cuda"))
    wanted = set(args.only) if args.only is not None else {"pytest", "example", *BENCHMARKS}
    if not cuda:
        print("device_check: no CUDA: skipped (torch.cuda.is_available() is False); checking "
              "the kit itself: the GPU tests collect, each GPU benchmark's --dry-run passes",
              flush=True)
    phases: dict[str, Any] = {}
    if "pytest" in wanted:
        phases["pytest"] = _pytest(out, clock, cuda)
    if "example" in wanted and cuda:
        phases["example"] = _example(out, clock)
    benches = [b for b in BENCHMARKS if b in wanted]
    for i, name in enumerate(benches):
        phases[f"bench_{name}"] = _bench(name, out, clock, cuda, 1.0 / (len(benches) - i))
    ok = all(p["status"] == "passed" for p in phases.values())
    tests = phases.get("pytest", {}).get("tests", {})
    if tests.get("failed"):
        ok = False
    summary = {
        "status": ("passed" if ok else "failed") if cuda
        else ("skipped: no CUDA (dry run passed)" if ok else "failed: the dry run"),
        "cuda": cuda, "seconds": round(time.monotonic() - started, 1), "out": str(out),
        "info": info, "phases": phases,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2, default=str))
    print(f"device_check: {summary['status']} in {summary['seconds']} s; summary in "
          f"{out / 'summary.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
