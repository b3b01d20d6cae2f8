"""`runtime.device_mesh` and `runtime.data_group` on 4 real gloo ranks: the groups the Mesh names."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.distributed as dist

import distlib as dl
from distlib import runtime
from distlib.testing import spawn
from distlib.topology import Mesh

pytestmark = pytest.mark.multiprocess


def _sums(env: dl.Env, sizes: dict[str, int]) -> dict[str, Any]:
    env = dataclasses.replace(env, mesh=Mesh(**sizes))
    rank = torch.tensor([float(env.rank)])
    data = rank.clone()
    dist.all_reduce(data, group=runtime.data_group(env))
    mesh = runtime.device_mesh(env)
    tp = rank.clone()
    dist.all_reduce(tp, group=mesh["tp"].get_group())
    again = runtime.device_mesh(env) is mesh and runtime.data_group(env) is runtime.data_group(env)
    return {"data": data.item(), "tp": tp.item(), "cached": again,
            "names": tuple(mesh.mesh_dim_names)}


@pytest.mark.parametrize("sizes", [{"dp_shard": 2, "tp": 2}, {"dp_replicate": 2, "cp": 2}])
def test_the_data_group_is_the_ranks_that_share_cp_and_tp(sizes: dict[str, int]) -> None:
    out = spawn(_sums, sizes, world_size=4, timeout_s=150).returns
    mesh = Mesh(**sizes).resolve(4)
    for rank, got in out.items():
        assert got["data"] == sum(mesh.group(["dp_replicate", "dp_shard"], rank))
        assert got["tp"] == sum(mesh.group(["tp"], rank))
        assert got["cached"] and got["names"] == ("dp_replicate", "dp_shard", "cp", "tp")


def test_a_data_parallel_mesh_needs_no_group() -> None:
    env = dl.Env(world_size=4, rank=1, local_world_size=4, local_rank=1)
    assert runtime.data_group(env) is None
