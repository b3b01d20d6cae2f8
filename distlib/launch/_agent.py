"""The agent process: torch's elastic agent started for one machine's share of a launch.

``python -m distlib.launch._agent SPEC.json`` reads a spec written by the launcher (the plan,
the worker command, where to write the outcome), runs torch's ``elastic_launch`` — which
starts, monitors, stops and restarts the ranks — and writes the outcome as JSON: either
success, or each failed rank's exit code and traceback. Torch's agent writes ``os.environ``
and installs signal handlers, which is why it runs here and not in the caller's process.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from distlib.launch._bootstrap import die_with_parent
from distlib.launch.plan import LaunchPlan

__all__ = ["main"]


def _launch_config(plan: LaunchPlan, log_dir: str) -> Any:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    nproc = plan.nproc_per_node or _visible_gpus(plan) or 1
    configs: dict[str, Any] = {"timeout": plan.collective_timeout_s or 900}
    if plan.rdzv_backend == "static":
        configs["rank"] = plan.machine_rank
    elif plan.max_machines > 1:
        configs["is_host"] = plan.machine_rank == 0
    return LaunchConfig(
        min_nodes=plan.min_machines, max_nodes=plan.max_machines, nproc_per_node=nproc,
        run_id=plan.run_id, role="rank", rdzv_backend=plan.rdzv_backend,
        rdzv_endpoint=f"{plan.main_address}:{plan.main_port}", rdzv_configs=configs,
        max_restarts=plan.max_restarts, monitor_interval=plan.monitor_interval_s,
        start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        shutdown_timeout=5,
    )


def _visible_gpus(plan: LaunchPlan) -> int:
    if plan.cpu:
        return 0
    import torch

    return int(torch.cuda.device_count())


def _failures(error: Any) -> list[dict[str, Any]]:
    """Each failed rank as plain data, the root cause first.

    The root cause is the earliest traceback that is not a complaint about a dead peer;
    ranks killed by the agent (no traceback) come last.
    """
    rows = []
    for rank, failure in error.failures.items():
        data = failure.error_file_data.get("message")
        info = data.get("extraInfo", {}) if isinstance(data, dict) else {}
        traceback = info.get("py_callstack") or ""
        order = int(info.get("distlib_time_ns", 0)) or failure.timestamp * 10**9
        rows.append({"rank": int(rank), "exitcode": failure.exitcode, "traceback": traceback,
                     "message": str(failure.message) if not traceback else "",
                     "order": (bool(info.get("distlib_secondary")), order) if traceback
                     else (True, 2**63)})
    rows.sort(key=lambda row: (row["order"], row["rank"]))
    for row in rows:
        del row["order"]
    return rows


def main(argv: Sequence[str]) -> int:
    """Run the agent for the spec at ``argv[0]``; return 0 when every rank succeeded."""
    die_with_parent()
    with open(argv[0], encoding="utf-8") as handle:
        spec = json.load(handle)
    plan = LaunchPlan(**spec["plan"])
    if not plan.debug:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
        logging.getLogger("torch.distributed.launcher").setLevel(logging.CRITICAL)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    config = _launch_config(plan, spec["log_dir"])
    command = spec["command"]
    outcome: dict[str, Any] = {"ok": True, "failures": [], "world_size": None}
    try:
        elastic_launch(config, command[0])(*command[1:])
    except ChildFailedError as error:
        outcome = {"ok": False, "failures": _failures(error)}
    except SignalException as error:
        outcome = {"ok": False, "failures": [], "signal": str(error.sigval.name)}
    tmp = spec["outcome"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(outcome, handle)
    os.replace(tmp, spec["outcome"])
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
