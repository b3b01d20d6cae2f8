"""shard, gather_metrics and reduce under a mesh, in one process (no process group)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import distlib as dl
from distlib import collectives, runtime
from distlib.env import Env
from distlib.errors import CollectiveError
from distlib.testing import fake_env
from distlib.topology import Mesh


def _no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make joining a process group an error, so a call that tries to is caught, not hung."""
    def refuse(env: Env, **_: object) -> None:
        raise AssertionError(f"joined a process group for {env.mesh}")

    monkeypatch.setattr(runtime, "initialize", refuse)


def test_a_tensor_parallel_only_mesh_has_one_data_rank_and_needs_no_group(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """tp = 4 over 4 ranks: every rank reads every batch; the metric collectives are
    identities (a group of one), while gather still spans the world."""
    _no_group(monkeypatch)
    mesh = Mesh(dp_shard=1, tp=4)
    data = list(range(7))
    for rank in range(4):
        env = fake_env(rank, 4, mesh=mesh)
        loader = dl.shard(DataLoader(data, batch_size=3), env)
        got = [dl.gather_metrics(b * 10, env, loader).tolist() for b in loader]
        assert got == [[0, 10, 20], [30, 40, 50], [60]]
        x = {"loss": torch.tensor([1.5]), "n": torch.tensor([3])}
        out = dl.reduce(x, env, op="sum")
        assert out["loss"] is x["loss"] and out["n"] is x["n"]
        assert dl.reduce(torch.tensor([2]), env).dtype.is_floating_point  # a mean, as on 1 rank
        with dl.split_between_processes(data, env) as mine:
            assert mine == data
    with pytest.raises(AssertionError, match="joined a process group"):
        dl.gather(torch.ones(1), fake_env(0, 4, mesh=mesh))


def test_data_ranks_are_the_dp_coordinate() -> None:
    mesh = Mesh(dp_replicate=2, cp=2).resolve(4)  # ranks (0, 1) and (2, 3) are cp peers
    got = [collectives.data_ranks(fake_env(r, 4, mesh=mesh), "t") for r in range(4)]
    assert [(r.size, r.rank, r.data) for r in got] == [(2, 0, True), (2, 0, True),
                                                      (2, 1, True), (2, 1, True)]
    plain = collectives.data_ranks(fake_env(3, 4), "t")
    assert (plain.size, plain.rank, plain.data) == (4, 3, False)  # the world, no sub-group


def test_gather_metrics_refuses_a_loader_dealt_over_other_ranks() -> None:
    """A loader sharded for a 2-rank data-parallel job cannot be gathered over 1 data rank."""
    loader = dl.shard(DataLoader(list(range(6)), batch_size=2), fake_env(0, 2))
    batch = next(iter(loader))
    tp_env = fake_env(0, 2, mesh=Mesh(dp_shard=1, tp=2))
    with pytest.raises(CollectiveError, match=r"loader must be sharded over the Env's 1 "
                       r"data-parallel ranks \(env.mesh.dp_size\), but got a loader dealt "
                       r"over 2\. Shard it with the Env you gather with"):
        dl.gather_metrics(batch, tp_env, loader)


def test_xla_refuses_metric_collectives_over_a_tp_or_cp_mesh(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torch_xla's collectives span every replica: a data sub-group cannot be honoured."""
    from distlib import _xla

    monkeypatch.setattr(runtime, "initialize", lambda env, **kw: None)
    monkeypatch.setattr(_xla, "all_gather", lambda t, dim=0: torch.cat([t] * 4))
    env = Env(rank=0, world_size=4, local_rank=0, local_world_size=4, backend="xla",
              device="xla:0", mesh=Mesh(dp_shard=2, tp=2))
    with pytest.raises(CollectiveError, match=r"reduce\(op='mean'\): on XLA the mesh must be "
                       r"all data parallel \(cp = tp = 1\), but got mesh dp_shard=2 x tp=2"):
        dl.reduce(torch.ones(1), env)
    loader = dl.shard(DataLoader(list(range(4)), batch_size=1), env, device_placement=False)
    batch = next(iter(loader))
    with pytest.raises(CollectiveError, match=r"gather_metrics\(\): on XLA the mesh"):
        dl.gather_metrics(batch, env, loader)
    assert dl.gather(torch.ones(1), env).tolist() == [1.0] * 4  # the world: still fine


def test_the_agreement_error_names_global_ranks_of_a_data_group() -> None:
    """In the data group (1, 3) of dp_shard 2 x tp 2, position 1 is global rank 3."""
    from distlib.collectives import _disagreement

    same, odd = "reduce(op='sum') of float32[2]", "reduce(op='sum') of float32[3]"
    message = _disagreement([same, odd], (1, 3))
    assert f"rank 3 passed {odd} while rank 1 passed {same}" in message
    assert "(ranks 1, 5 disagree)" in _disagreement([odd, same, odd, same, same], (1, 3, 5, 7, 9))
