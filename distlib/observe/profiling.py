"""Profiles: `profile` runs ``torch.profiler`` with a schedule and writes one trace per rank.

The traces are Chrome-trace JSON files ``<folder>/rank<R>.<time>.pt.trace.json`` (one per
active cycle), opened by TensorBoard's profiler plugin (``tensorboard --logdir <folder>``),
by https://ui.perfetto.dev or by ``chrome://tracing``. Where CUDA is in use, an out-of-memory
error inside the block also leaves ``<folder>/rank<R>.oom_snapshot.pickle``: the CUDA caching
allocator's memory history (open it at https://pytorch.org/memory_viz). On a CPU there is no
such history, and nothing is recorded.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity, schedule, tensorboard_trace_handler

from distlib.env import Env
from distlib.errors import ConfigError

__all__ = ["profile", "records_memory_history"]


def records_memory_history(env: Env, *, cuda_available: bool | None = None) -> bool:
    """Whether `profile` records CUDA's memory history for a snapshot on out-of-memory.

    Examples:
        >>> records_memory_history(Env()), records_memory_history(Env(device="cuda:0"),
        ...                                                        cuda_available=True)
        (False, True)
    """
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    return env.device.startswith("cuda") and available


def _check_schedule(**counts: int) -> None:
    for name, value in counts.items():
        least = 1 if name == "active" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            msg = (f"profile(): {name} must be an int >= {least}, but got {value!r}. The "
                   "schedule skips `wait` steps, warms up for `warmup`, records `active`, "
                   "`repeat` times (0: until the block ends).")
            raise ConfigError(msg)


@contextlib.contextmanager
def profile(env: Env, folder: str | os.PathLike[str], *, wait: int = 1, warmup: int = 1,
            active: int = 3, repeat: int = 1, record_shapes: bool = False,
            profile_memory: bool = False, with_stack: bool = False,
            memory_snapshot_on_oom: bool = True, **kwargs: Any) -> Iterator[Any]:
    """Profile the steps inside the block; call ``.step()`` on what it yields after each step.

    Args:
        env: this process's Env (its rank names the trace; its device picks the activities).
        folder: one folder for every rank's traces (created if missing).
        wait: ``torch.profiler.schedule``'s steps to skip at the start of each cycle.
        warmup: its steps traced but not recorded, after ``wait``.
        active: its steps recorded, after ``warmup``.
        repeat: how many such cycles (0: as many as the block runs).
        record_shapes: as ``torch.profiler.profile``.
        profile_memory: as ``torch.profiler.profile``.
        with_stack: as ``torch.profiler.profile``.
        memory_snapshot_on_oom: on CUDA, record the allocator's history and dump it when a
            ``torch.OutOfMemoryError`` leaves the block (the error is raised again).
        **kwargs: more ``torch.profiler.profile`` keywords (``with_flops``, ``activities``...).

    Yields:
        The ``torch.profiler.profile`` object.

    Raises:
        ConfigError: a schedule count that is not an int (``active`` >= 1, others >= 0).

    Examples:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> with profile(Env(), folder, wait=0, warmup=1, active=1) as prof:
        ...     for _ in range(3):
        ...         _ = torch.ones(8) @ torch.ones(8)
        ...         prof.step()
        >>> [p.name.split(".")[0] for p in pathlib.Path(folder).glob("*.pt.trace.json")]
        ['rank0']

    Effects: creates ``folder`` and writes trace files into it; on CUDA, turns the
    allocator's memory history on for the block (and off after it).
    """
    _check_schedule(wait=wait, warmup=warmup, active=active, repeat=repeat)
    path = pathlib.Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if env.device.startswith("cuda") and torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    kwargs.setdefault("activities", activities)
    snapshot = memory_snapshot_on_oom and records_memory_history(env)
    if snapshot:
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    prof = torch.profiler.profile(
        schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=repeat),
        on_trace_ready=tensorboard_trace_handler(str(path), worker_name=f"rank{env.rank}"),
        record_shapes=record_shapes, profile_memory=profile_memory, with_stack=with_stack,
        **kwargs)
    try:
        with prof:
            yield prof
    except torch.OutOfMemoryError:
        if snapshot:
            torch.cuda.memory._dump_snapshot(  # type: ignore[no-untyped-call]
                str(path / f"rank{env.rank}.oom_snapshot.pickle"))
        raise
    finally:
        if snapshot:
            torch.cuda.memory._record_memory_history(enabled=None)
