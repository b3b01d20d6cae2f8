"""``distlib test``: launch the self-test under the current config and print what each rank saw.

Before anything starts, a strategy or precision whose package is missing is refused in one
line naming its install command (`distlib.launcher._backends`). The checks fit the
strategy's model-specific options to their toy models (`distlib.cli._selftest`); what they
cannot fit is listed as "not checked: needs your model", not failed.

The test is a list of checks, each named ``"module:function"`` (the built-in ones are in
`distlib.cli._checks`). A check runs in every rank, inside the joined process group, as
``function(env) -> str``: it returns a short detail for the table and raises to fail (the
built-in checks raise distlib errors, never ``assert``, so ``python -O`` cannot hide a
failure). ``distlib test --check module:function`` adds one for a single run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from distlib.cli._args import spellings
from distlib.cli._selftest import plan_self_test
from distlib.cli.launch import add_setting_arguments, resolve_from_args
from distlib.errors import ConfigError, LaunchError
from distlib.launcher._backends import missing_backend
from distlib.launcher.config import to_plan
from distlib.launcher.launcher import launch_plan
from distlib.launcher.plan import LaunchPlan
from distlib.strategies.base import parse_strategy

__all__ = ["CHECKS", "RUNNER", "add_arguments", "format_report", "not_checked", "run"]

# The built-in checks and the rank-side runner are named "module:function" like a user's
# --check, and loaded by name in the ranks: importing them here (they import torch) would make
# `distlib test --help` import torch.
_CHECKS_MODULE = "distlib.cli._checks"
RUNNER = f"{_CHECKS_MODULE}:run_checks"
CHECKS: tuple[str, ...] = tuple(f"{_CHECKS_MODULE}:{name}" for name in (
    "check_all_reduce", "check_all_gather", "check_broadcast", "check_sharded_loader",
    "check_training", "check_mesh", "check_save_load"))


def _in_rank(runner: str, names: tuple[str, ...]) -> Any:
    """In each launched rank: load ``runner`` by its "module:function" name and run the checks."""
    module, _, function = runner.partition(":")
    return getattr(importlib.import_module(module), function)(names)


def _span(ranks: list[int]) -> str:
    """``[0, 1, 2, 3]`` -> ``"ranks 0-3"``; ``[0, 2]`` -> ``"ranks 0, 2"``; ``[1]`` -> ``"rank 1"``."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks))


def _details(short: list[str], reports: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """One line per check: what its passing ranks reported, ranks with the same text together."""
    width = max(map(len, short), default=0)
    lines = []
    for i, name in enumerate(short):
        seen: dict[str, list[int]] = {}
        for rank, report in sorted(reports.items()):
            check = report["checks"][i]
            if check["ok"]:
                seen.setdefault(str(check["detail"]), []).append(rank)
        if seen:
            text = " | ".join(f"{_span(ranks)}: {detail}" for detail, ranks in seen.items())
            lines.append(f"  {name.ljust(width)}  {text}")
    return lines


def format_report(reports: Mapping[int, Mapping[str, Any]],
                  notes: Sequence[str] = ()) -> tuple[str, bool]:
    """The table (one row per rank, one column per check), each check's details, the options
    not checked (``notes``, not failures), the failures, and whether everything passed."""
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
    lines += _details(short, reports)
    lines += [f"  {'not checked'.ljust(max(map(len, short), default=0))}  {note}"
              for note in notes]
    lines += [f"  {line}" for line in failed]
    lines.append(f"distlib test: PASSED ({len(reports)} ranks, {len(names)} checks each)" if ok
                 else f"distlib test: FAILED ({len(failed)} failed checks)")
    return "\n".join(lines), ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's options (the launch settings, plus --check)."""
    parser.usage = "distlib test [options] [--check MODULE:FUNCTION ...]"
    add_setting_arguments(parser)
    parser.add_argument(*spellings("--check"), action="append", default=[], metavar="MODULE:FUNCTION",
                        help="run this check too (repeatable)")


def not_checked(plan: LaunchPlan) -> tuple[str, ...]:
    """The options of the plan's strategy the self-test leaves to the user's model.

    Raises:
        ConfigError: a DeepSpeed config file that is not a readable JSON object.

    Example:
        >>> print(*not_checked(LaunchPlan(nproc_per_node=2, strategy="fsdp",
        ...                               strategy_options={"activation_checkpointing": True})))
        fsdp_activation_checkpointing: wrap applies it to FSDP units, and with no fsdp_wrap_classes and no fsdp_min_num_params no model has any (wrap refuses it on yours unless it has units)
    """
    if plan.strategy is None:  # each rank's default: Single, DDP or FSDP, without options
        return ()
    strategy = parse_strategy(plan.strategy, plan.strategy_options, source="distlib test")
    return plan_self_test(strategy).not_checked


def run(args: argparse.Namespace) -> int:
    """Launch the checks under the resolved config; print the table; 0 when all passed.

    Raises:
        ConfigError: the strategy's or precision's package is missing (before anything
            starts), or the settings are wrong.
    """
    resolved, path = resolve_from_args(args, os.environ)
    plan = to_plan(resolved)
    missing = missing_backend(plan)
    if missing is not None:
        raise ConfigError(missing)
    notes = not_checked(plan)
    if plan.collective_timeout_s is None:  # a broken check must not wait 30 minutes
        plan = dataclasses.replace(plan, collective_timeout_s=120)
    print(f"distlib test: config {path or '(none: flags and defaults)'}", flush=True)
    try:
        result = launch_plan(plan, functools.partial(_in_rank, RUNNER, (*CHECKS, *args.check)))
    except LaunchError as error:
        print(f"{error}\ndistlib test: FAILED (the launch itself failed)", file=sys.stderr)
        return 1
    text, ok = format_report(result.returns, notes)
    print(text)
    return 0 if ok else 1
