"""shard, gather_metrics and reduce over the data-parallel group of a mesh, on 4 gloo ranks.

Both meshes run in one launch (dp_shard 2 x tp 2, then dp_replicate 2 x cp 2, set with
``dataclasses.replace(env, mesh=...)``); the parent compares every rank with one process.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import distlib as dl
from distlib import runtime
from distlib.errors import CollectiveError
from distlib.testing import spawn
from distlib.topology import DATA_AXES, Mesh
from tests.models import Stream

pytestmark = pytest.mark.multiprocess

MESHES = ({"dp_shard": 2, "tp": 2}, {"dp_replicate": 2, "cp": 2})
N = 23  # 3 steps of 2 dp ranks x 4: the last step is padded


def _features() -> torch.Tensor:
    return torch.randn(N, 3, generator=torch.Generator().manual_seed(0))


def _model() -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(3, 2)


def _one_mesh(env: dl.Env) -> dict[str, Any]:
    model, out = _model(), {}
    out["group_rank"] = dist.get_rank(runtime.data_group(env))
    loader = dl.shard(DataLoader(TensorDataset(torch.arange(N), _features()), batch_size=4), env)
    ids, preds, tags, losses, step0 = [], [], [], [], None
    with torch.no_grad():
        for index, x in loader:
            y = model(x)
            got = dl.gather_metrics({"id": index, "y": y, "tag": [f"s{i}" for i in index.tolist()]},
                                    env, loader)
            ids += got["id"].tolist()
            preds += got["y"].tolist()
            tags += got["tag"]
            losses.append(dl.reduce(y.sum(), env, op="sum").item())
            if step0 is None:  # a full step: the mean of the dp ranks' batch means
                step0 = dl.reduce(y.mean(0), env).tolist()
    out.update(ids=ids, preds=preds, tags=tags, losses=losses, step0=step0)
    out["read"] = [b.tolist() for b in dl.shard(DataLoader(list(range(N)), batch_size=4), env)]
    uneven = dl.shard(DataLoader(Stream(N), batch_size=4), env, even_batches=False)
    mine = [b for b in uneven]
    whole = torch.cat(mine) if mine else torch.zeros(0, dtype=torch.long)
    out["uneven"] = dl.gather_metrics(whole, env, uneven).tolist()
    rank = torch.tensor([float(env.rank)])
    out["reduce_rank"] = {op: dl.reduce(rank, env, op=op).item() for op in ("sum", "mean", "max")}
    out["gather_world"] = dl.gather(rank, env).tolist()  # gather stays over the world
    try:  # the check runs in the data group: only the group with the odd rank fails
        dl.reduce(torch.ones(3 if env.rank == 3 else 2), env, op="sum")
        out["odd"] = "ok"
    except CollectiveError as error:
        out["odd"] = str(error)
    out["after"] = dl.reduce(torch.ones(1), env, op="sum").item()  # the groups still work
    return out


def _scenarios(env: dl.Env) -> dict[str, Any]:
    out = {}
    for sizes in MESHES:
        meshed = dataclasses.replace(env, mesh=Mesh(**sizes))  # Env resolves the -1 axis
        out[str(meshed.mesh)] = _one_mesh(meshed)
    return out


def test_shard_gather_metrics_and_reduce_over_the_data_group_match_one_process() -> None:
    result = spawn(_scenarios, world_size=4, timeout_s=240).returns
    with torch.no_grad():
        want = _model()(_features())
    # What each data-parallel rank reads: alternate loader batches; the short last step is
    # completed from the start of the pass (dp rank 1 gets [20, 21, 22] + [0]).
    read = {0: [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]],
            1: [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 22, 0]]}
    for sizes in MESHES:
        mesh = Mesh(**sizes).resolve(4)
        for rank in range(4):
            got = result[rank][str(mesh)]
            dp_rank, peers = mesh.dp_rank(rank), mesh.group(DATA_AXES, rank)
            assert got["group_rank"] == dp_rank
            # shard: dealt by the dp rank; tp/cp peers read the same batches.
            assert got["read"] == read[dp_rank]
            for peer in mesh.group(["cp", "tp"], rank):
                assert result[peer][str(mesh)]["read"] == got["read"]
            # gather_metrics over the dp group: exactly the one-process outputs, in order.
            assert got["ids"] == list(range(N))
            assert got["tags"] == [f"s{i}" for i in range(N)]  # plain rows, over the group too
            torch.testing.assert_close(torch.tensor(got["preds"]), want, rtol=1e-6, atol=1e-6)
            assert got["uneven"] == list(range(N))
            # reduce over the dp group: each batch counted once, not once per tp/cp peer.
            sums = [want[i:i + 8].sum().item() for i in range(0, 16, 8)]
            last = torch.cat([want[16:], want[:1]]).sum().item()  # 7 real rows + 1 padding
            assert got["losses"] == pytest.approx([*sums, last], rel=1e-5)
            assert got["step0"] == pytest.approx(want[:8].mean(0).tolist(), rel=1e-5)
            assert got["reduce_rank"] == {"sum": float(sum(peers)),
                                          "mean": sum(peers) / 2, "max": float(max(peers))}
            assert got["gather_world"] == [0.0, 1.0, 2.0, 3.0]
            assert got["after"] == 2.0
            if 3 in peers:
                assert got["odd"].startswith("reduce(op='sum'): every rank must make the same")
                assert (f"rank 3 passed reduce(op='sum') of float32[3] while rank {peers[0]} "
                        "passed reduce(op='sum') of float32[2]") in got["odd"]
            else:
                assert got["odd"] == "ok"
