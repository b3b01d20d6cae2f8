"""One step of a save on every rank, all or none: each rank's outcome is exchanged, and if
any rank failed every rank raises and the partial folder is removed.

`save_state` runs each step (the writes, then the commit) through `all_or_none`; an async
save runs its background steps over the gloo group of its own (`distlib.checkpoint._async`).
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from distlib.checkpoint import _folder as folders
from distlib.collectives import barrier, gather_object
from distlib.env import Env
from distlib.errors import CheckpointError

__all__ = ["all_or_none", "exchange"]


def exchange(env: Env, value: Any, group: Any = None) -> list[Any]:
    """Every rank's ``value``, in rank order; the one sync point of each step of a save.

    ``group``: an async save's own gloo group (its thread must not share the default group
    with the training loop's collectives). Under XLA objects cannot be exchanged: the ranks
    only wait for each other, and a rank's failure is raised by that rank alone (the launcher
    then ends the job).
    """
    if group is not None:
        out: list[Any] = [None] * env.world_size
        dist.all_gather_object(out, value, group=group)
        return out
    if env.backend == "xla":
        barrier(env)
        return [value]
    return gather_object([value], env)


def all_or_none(env: Env, work: Callable[[], Any], staging: pathlib.Path, path: pathlib.Path,
                 needed: int, group: Any = None) -> Any:
    """Run one step of a save on every rank; if any rank fails, every rank raises and the
    partial folder is removed (a full disk is a `CheckpointError` that says so)."""
    result, own, failure = None, None, None
    try:
        result = work()
    except (Exception, CheckpointException) as exc:  # DCP's error is a BaseException
        own = exc
        failure = folders.describe_failure(exc, env.rank, staging, needed)
    failures = [f for f in exchange(env, failure, group) if f is not None]
    if not failures:
        return result
    if env.is_main:
        with contextlib.suppress(OSError):
            folders.remove_folder(staging)
    full = [f for f in failures if f.disk_full]
    if full:
        msg = folders.disk_full_message(full[0], staging, path, needed, "save_state()")
        raise CheckpointError(msg) from own
    if own is not None and isinstance(own, Exception):
        raise own
    # DCP's CheckpointException is a BaseException (an `except Exception` would miss it):
    # every rank raises a CheckpointError naming the first rank that failed, from it.
    msg = (f"save_state(): every rank must write its part of {staging}, but rank "
           f"{failures[0].rank} failed ({failures[0].text}). See that rank's error; the partial "
           "save was removed.")
    raise CheckpointError(msg) from own
