"""``distlib test``: launch a self-test under the current config and print what each rank saw.

The test is a list of checks, each named ``"module:function"``. A check runs in every rank,
inside the joined process group, as ``function(env) -> str``: it returns a short detail for
the table and raises (``AssertionError`` or anything else) to fail. Every rank runs every
check in the same order, so checks may use collectives. Another area adds a check by adding
one entry to `CHECKS`; ``distlib test --check module:function`` adds one for a single run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CHECKS", "add_arguments", "check_all_gather", "check_all_reduce",
           "check_broadcast", "format_report", "run", "run_checks"]

CHECKS: tuple[str, ...] = (
    "distlib.cli.test:check_all_reduce",
    "distlib.cli.test:check_all_gather",
    "distlib.cli.test:check_broadcast",
    "distlib._data_selftest:check_sharded_loader",
    "distlib.step:check_training",
    "distlib.checkpoint:check_save_load",
)


def check_all_reduce(env: Any) -> str:
    """Sum ``rank + 1`` over all ranks; compare with ``n (n + 1) / 2``."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([float(env.rank + 1)], device=env.device)
    if env.is_distributed:
        dist.all_reduce(value)
    expected = env.world_size * (env.world_size + 1) / 2
    assert value.item() == expected, f"sum {value.item()} != {expected}"
    return f"sum={value.item():g}"


def check_all_gather(env: Any) -> str:
    """Gather every rank's id; compare with ``[0, 1, ..., n - 1]``."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor([float(env.rank)], device=env.device)
    parts = [torch.zeros_like(mine) for _ in range(env.world_size)]
    if env.is_distributed:
        dist.all_gather(parts, mine)
    else:
        parts = [mine]
    got = [int(p.item()) for p in parts]
    assert got == list(range(env.world_size)), f"gathered {got}"
    return f"{got}" if env.world_size <= 8 else "ok"


def check_broadcast(env: Any) -> str:
    """Broadcast a value from rank 0; every rank must receive it."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([42.0 if env.rank == 0 else -1.0], device=env.device)
    if env.is_distributed:
        dist.broadcast(value, src=0)
    assert value.item() == 42.0, f"received {value.item()}"
    return "42"


def _load(name: str) -> Any:
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def run_checks(names: Sequence[str]) -> dict[str, Any]:
    """In a launched rank: join the group, run each check, return this rank's report.

    Effects: joins and leaves the default process group.
    """
    from distlib.env import detect
    from distlib.runtime import process_group

    env = detect()
    report: dict[str, Any] = {"rank": env.rank, "world": env.world_size,
                              "local": env.local_rank, "node": env.node_rank,
                              "device": env.device, "backend": env.backend,
                              "strategy": env.strategy.name, "precision": str(env.precision),
                              "checks": []}
    with process_group(env):
        for name in names:
            start = time.monotonic()
            try:
                detail, ok = str(_load(name)(env)), True
            except Exception as error:  # a failed check is a row in the table, not a crash
                detail, ok = f"{type(error).__name__}: {error}", False
                if env.debug:
                    traceback.print_exc()
            report["checks"].append({"name": name, "ok": ok, "detail": detail,
                                     "seconds": round(time.monotonic() - start, 3)})
    return report


def format_report(reports: Mapping[int, Mapping[str, Any]]) -> tuple[str, bool]:
    """The table (one row per rank, one column per check) and whether everything passed."""
    names = [c["name"] for c in next(iter(reports.values()))["checks"]] if reports else []
    short = [n.rpartition(":")[2].removeprefix("check_") for n in names]
    head = ["rank", "world", "local", "node", "device", "backend", "strategy", "precision"]
    rows = []
    failed: list[str] = []
    for rank, report in sorted(reports.items()):
        cells = [str(report[k]) for k in ("rank", "world", "local", "node", "device",
                                          "backend", "strategy", "precision")]
        for check in report["checks"]:
            cells.append("ok" if check["ok"] else "FAIL")
            if not check["ok"]:
                failed.append(f"rank {rank} {check['name']}: {check['detail']}")
        rows.append(cells)
    header = head + short
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    ok = bool(reports) and not failed
    lines += [f"  {line}" for line in failed]
    lines.append(f"distlib test: PASSED ({len(reports)} ranks, {len(names)} checks each)" if ok
                 else f"distlib test: FAILED ({len(failed)} failed checks)")
    return "\n".join(lines), ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's options (the launch settings, plus --check)."""
    from distlib.cli.launch import add_setting_arguments

    add_setting_arguments(parser)
    parser.add_argument("--check", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="run this check too (repeatable)")


def run(args: argparse.Namespace) -> int:
    """Launch the checks under the resolved config; print the table; 0 when all passed."""
    import dataclasses
    import functools

    from distlib.errors import LaunchError
    from distlib.launcher.config import to_plan
    from distlib.cli.launch import resolve_from_args
    from distlib.launcher.launcher import launch_plan

    resolved, path = resolve_from_args(args, os.environ)
    plan = to_plan(resolved)
    if plan.collective_timeout_s is None:  # a broken check must not wait 30 minutes
        plan = dataclasses.replace(plan, collective_timeout_s=120)
    print(f"distlib test: config {path or '(none: flags and defaults)'}", flush=True)
    try:
        result = launch_plan(plan, functools.partial(run_checks, (*CHECKS, *args.check)))
    except LaunchError as error:
        print(f"{error}\ndistlib test: FAILED (the launch itself failed)", file=sys.stderr)
        return 1
    text, ok = format_report(result.returns)
    print(text)
    return 0 if ok else 1
