"""Ranks that decide together: `any_rank`, a flag every rank sees the same.

For early stopping, skipping a step or a batch: when one rank's condition holds, every rank
must act, or the next collective hangs. One all-reduce (MAX) of one number over the world.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from distlib.collectives import reduce
from distlib.env import Env
from distlib.topology import Mesh

__all__ = ["any_rank"]


def any_rank(flag: Any, env: Env) -> bool:
    """True on every rank when any rank passes a true ``flag`` (a bool or a one-element tensor).

    Every rank must call it at the same point (it is a collective). On one process it is
    ``bool(flag)``.

    Examples:
        >>> any_rank(True, Env()), any_rank(torch.tensor(0), Env())
        (True, False)

    Effects: joins the process group on first need; one all-reduce over the whole world,
    on ``env.device``.
    """
    if env.world_size == 1:
        return bool(flag)
    world = dataclasses.replace(env, mesh=Mesh())  # every rank, whatever the mesh
    mine = torch.tensor([1 if bool(flag) else 0], dtype=torch.int32, device=env.device)
    return bool(reduce(mine, world, op="max", check=False).item())
