"""Public helpers for testing code built on distlib: fake Envs, free ports, spawning ranks.

``fake_env`` builds the `Env` of any rank without launching anything (loop over ranks in one
process to check per-rank logic). ``spawn`` runs a function in real gloo ranks on this
machine through `distlib.launch` and returns each rank's value to the caller, which
compares them with a single-process computation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from distlib.env import Env, detect
from distlib.launcher.launcher import LaunchResult, free_port, launch
from distlib.runtime import process_group

__all__ = ["fake_env", "free_port", "run_in_group", "spawn"]


def fake_env(rank: int = 0, world_size: int = 1, *, num_nodes: int = 1, **fields: Any) -> Env:
    """Build the `Env` of ``rank`` in a ``world_size`` job, spread evenly over ``num_nodes``.

    Local rank, local world size and node rank follow from the counts unless given in
    ``fields`` (any other `Env` field too: ``device``, ``strategy``, ``precision``, ...).

    Example:
        >>> env = fake_env(rank=5, world_size=8, num_nodes=2)
        >>> env.local_rank, env.local_world_size, env.node_rank
        (1, 4, 1)
    """
    per_node = fields.pop("local_world_size", max(world_size // num_nodes, 1))
    values: dict[str, Any] = {
        "local_rank": rank % per_node, "node_rank": rank // per_node,
        "local_world_size": per_node, "strategy": "ddp" if world_size > 1 else "single",
    }
    values.update(fields)
    return Env(rank=rank, world_size=world_size, num_nodes=num_nodes, **values)


def run_in_group(fn: Callable[..., Any], *args: Any) -> Any:
    """Inside a launched rank: detect the Env, join the group, return ``fn(env, *args)``.

    Effects: joins the default process group for the call and always leaves it.
    """
    with process_group(detect()) as env:
        return fn(env, *args)


def spawn(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout_s: float = 180.0,
          join_group: bool = True, **options: Any) -> LaunchResult:
    """Run ``fn(env, *args)`` in ``world_size`` CPU ranks (gloo, 127.0.0.1); return the values.

    ``fn`` must be importable by the ranks (module level in a module or test file) or defined
    in ``__main__``. With ``join_group=False`` the ranks call ``fn(*args)`` without an Env.

    Args:
        fn: the function each rank runs.
        *args: positional arguments after the Env.
        world_size: the number of ranks.
        timeout_s: stop everything and raise `LaunchError` after this long.
        join_group: detect the Env and join the process group around the call.
        **options: more `launch` options (``precision``, ``strategy``, ``max_restarts``...).

    Returns:
        The `LaunchResult`: ``result[rank]`` is rank's return value.

    Raises:
        LaunchError: a rank raised (the message holds its traceback) or the job timed out.

    Example:
        >>> spawn(lambda env: env.rank, world_size=2)[1]  # doctest: +SKIP
        1

    Effects: starts processes; the caller's environment is left untouched.
    """
    options.setdefault("cpu", True)
    target = functools.partial(run_in_group, fn) if join_group else fn
    return launch(target, *args, num_processes=world_size, timeout_s=timeout_s, **options)
