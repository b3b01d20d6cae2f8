"""The agent process: torch's elastic agent started for one machine's share of a launch.

``python -m distlib.launch._agent SPEC.json`` reads a spec written by the launcher (the plan,
the worker command, where to write the outcome), runs torch's ``elastic_launch`` — which
starts, monitors, stops and restarts the ranks — and writes the outcome as JSON: either
success, or each failed rank's exit code and traceback. Torch's agent writes ``os.environ``
and installs signal handlers, which is why it runs here and not in the caller's process.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from distlib.launch._bootstrap import die_with_parent, fork_entry
from distlib.launch._environ import rank_threads
from distlib.launch.plan import LaunchPlan

__all__ = ["main"]


def _nproc(plan: LaunchPlan) -> int:
    # XLA: one process per machine; torch_xla starts the replicas in it (xmp.spawn) or, under
    # SPMD, that one process drives every device.
    return 1 if plan.strategy == "xla" else plan.nproc_per_node or _visible_gpus(plan) or 1


def _num_cpus() -> int:
    """The cores this process may run on: physical cores, within its CPU affinity."""
    import psutil

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    return min(cores, allowed) if allowed else cores


def _launch_config(plan: LaunchPlan, log_dir: str, start_method: str) -> Any:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    nproc = _nproc(plan)
    configs: dict[str, Any] = {"timeout": plan.collective_timeout_s or 900}
    if plan.rdzv_backend == "static":
        configs["rank"] = plan.machine_rank
    elif plan.max_machines > 1:
        configs["is_host"] = plan.machine_rank == 0
    # shutdown_timeout is newer than torch 2.9 (the XLA session's torch): pass it where it exists.
    extra: dict[str, Any] = ({"shutdown_timeout": 5} if "shutdown_timeout" in getattr(
        LaunchConfig, "__dataclass_fields__", {}) else {})
    return LaunchConfig(
        min_nodes=plan.min_machines, max_nodes=plan.max_machines, nproc_per_node=nproc,
        run_id=plan.run_id, role="rank", rdzv_backend=plan.rdzv_backend,
        rdzv_endpoint=f"{plan.main_address}:{plan.main_port}", rdzv_configs=configs,
        max_restarts=plan.max_restarts, monitor_interval=plan.monitor_interval_s,
        start_method=start_method, logs_specs=DefaultLogsSpecs(log_dir=log_dir), **extra,
    )


def _visible_gpus(plan: LaunchPlan) -> int:
    if plan.cpu:
        return 0
    import torch

    return int(torch.cuda.device_count())  # NVML-based (see main): no CUDA context here


def _fork(plan: LaunchPlan, command: Sequence[str]) -> bool:
    """Fork Python ranks from this process when no GPU is in use (CUDA is not fork-safe)."""
    if list(command[1:4]) != ["-u", "-m", "distlib.launch._bootstrap"]:
        return False  # --no-python programs are always started fresh
    if plan.start_method != "auto":
        return plan.start_method == "fork"
    return _visible_gpus(plan) == 0


def _recorded(log_dir: str) -> dict[int, dict[str, Any]]:
    """Tracebacks the ranks of the latest attempt recorded, by global rank.

    torch reports one failure per attempt when ranks run as forked functions (the first it
    notices, often a rank that only saw its peer die), so read every rank's error file.
    """
    found: dict[int, dict[str, Any]] = {}
    for path in glob.glob(os.path.join(log_dir, "**", "error.json"), recursive=True):
        try:
            with open(path, encoding="utf-8") as handle:
                info = json.load(handle)["message"]["extraInfo"]
            key = (int(info["distlib_attempt"]), int(info["distlib_rank"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found[key[1]] = info | {"attempt": key[0]}
    latest = max((info["attempt"] for info in found.values()), default=0)
    return {rank: info for rank, info in found.items() if info["attempt"] == latest}


def _no_traceback(exitcode: int) -> str:
    if exitcode < 0:
        return f"(stopped by signal {-exitcode}; no Python traceback)"
    return (f"(exited with code {exitcode} without a Python traceback: sys.exit(), a program "
            "run with --no-python, or a crash; see the rank's own output above)")


def _failures(error: Any, log_dir: str) -> list[dict[str, Any]]:
    """Each failed rank as plain data, the root cause first.

    The root cause is the earliest traceback that is not a complaint about a dead peer;
    ranks killed by the agent (no traceback) come last.
    """
    exits = {int(rank): failure for rank, failure in error.failures.items()}
    recorded = _recorded(log_dir)
    rows = []
    for rank in sorted(set(exits) | set(recorded)):
        info = recorded.get(rank, {})
        traceback = info.get("py_callstack") or ""
        failure = exits.get(rank)
        exitcode = failure.exitcode if failure is not None else 1
        order = int(info.get("distlib_time_ns", 0))
        rows.append({"rank": rank, "exitcode": exitcode, "traceback": traceback,
                     "secondary": bool(info.get("distlib_secondary")),
                     "message": "" if traceback else _no_traceback(exitcode),
                     "order": (bool(info.get("distlib_secondary")), order) if traceback
                     else (True, 2**63)})
    rows.sort(key=lambda row: (row["order"], row["rank"]))
    for row in rows:
        del row["order"]
    return rows


def _stdin_copy() -> int:
    """A duplicate of stdin for forked ranks (multiprocessing closes theirs), or -1."""
    try:
        return os.dup(0)
    except OSError:
        return -1


def _read_spec(source: str) -> dict[str, Any] | None:
    """The spec from a pipe (``fd:N``) or a file; None when the pipe closed without one."""
    try:
        if source.startswith("fd:"):
            with os.fdopen(int(source[3:]), "rb") as pipe:
                return dict(json.loads(pipe.read() or b"null") or {}) or None
        with open(source, encoding="utf-8") as handle:
            return dict(json.load(handle))
    except json.JSONDecodeError:
        return None


def main(argv: Sequence[str]) -> int:
    """Run the agent for the spec at ``argv[0]`` (``fd:N``: a pipe); 0 when all ranks succeeded.

    torch is imported before the spec is read, so a launcher that starts this process first
    overlaps the import with its own planning.
    """
    die_with_parent()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    spec = _read_spec(argv[0])
    if spec is None:
        return 0  # the launcher stopped before launching (a config error, Ctrl-C)
    os.environ.clear()  # this process is the launcher's: the ranks inherit exactly this
    os.environ.update(spec["environ"])
    plan = LaunchPlan(**spec["plan"])
    if not plan.debug:
        for name in ("torch.distributed.elastic", "torch.distributed.launcher",
                     "torch.multiprocessing"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    # Count GPUs through NVML so this process never creates a CUDA context (it may fork);
    # the variable is gone again before the ranks start, so they inherit nothing of it.
    saved = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    command = spec["command"]
    fork = _fork(plan, command)
    threads = rank_threads(plan, os.environ, nproc=_nproc(plan),
                           gpu_ranks=_visible_gpus(plan) > 0, num_cpus=_num_cpus())
    if threads is not None:  # the ranks inherit it; forked ones apply it (see fork_entry)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    config = _launch_config(plan, spec["log_dir"], "fork" if fork else "spawn")
    if saved is None:
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
    else:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = saved
    entrypoint: Any = fork_entry if fork else command[0]
    outcome: dict[str, Any] = {"ok": True, "failures": []}
    try:
        args = [str(_stdin_copy()), *command[4:]] if fork else command[1:]
        elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as error:
        outcome = {"ok": False, "failures": _failures(error, spec["log_dir"])}
    except SignalException as error:
        outcome = {"ok": False, "failures": [], "signal": str(error.sigval.name)}
    tmp = spec["outcome"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(outcome, handle)
    os.replace(tmp, spec["outcome"])
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # The outcome file is written and closed, the ranks are gone: skip tearing down torch's
    # modules (a second or so on a busy machine) that nobody waits for.
    os._exit(code)
