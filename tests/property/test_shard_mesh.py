"""shard(), the gather dedup and split_between_processes under a mesh: dealt by the dp rank.

Every rank of a ``dp_replicate x dp_shard x cp x tp`` job in one process (fake Envs with the
mesh; a sequential sampler or a seeded generator needs no agreed seed, so no process group):
the ranks of one tp/cp group read identical batches, the data-parallel ranks cover the data,
and gathering over the data-parallel ranks and dropping the padding gives the data back exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import distlib as dl
from distlib._shard_plan import StepInfo, keep_index
from distlib.testing import fake_env
from distlib.topology import DATA_AXES, Mesh
from tests.models import Stream

SETTINGS = settings(max_examples=80, deadline=None)


@st.composite
def meshes(draw: Any) -> Mesh:
    """A resolved mesh of up to 12 ranks, every axis from 1 to 3 (often more than one > 1)."""
    sizes = {axis: draw(st.integers(1, 3)) for axis in ("dp_replicate", "dp_shard", "cp", "tp")}
    if sizes["dp_replicate"] * sizes["dp_shard"] * sizes["cp"] * sizes["tp"] > 12:
        sizes["dp_replicate"] = 1
    mesh = Mesh(**sizes)
    return mesh.resolve(mesh.world_size)


@st.composite
def loaders(draw: Any, mesh: Mesh) -> dict[str, Any]:
    """How to build one loader (the same on every rank) and the shard options."""
    kind = draw(st.sampled_from(["map", "iterable", "shuffled"]))
    split = draw(st.booleans())
    batch = draw(st.integers(1, 4)) * (mesh.dp_size if split else 1)
    return {"kind": kind, "n": draw(st.integers(1 if kind == "shuffled" else 0, 40)), "batch": batch,
            "drop_last": draw(st.booleans()),
            "options": {"split_batches": split, "even_batches": draw(st.booleans())}}


def _make(spec: dict[str, Any]) -> DataLoader[int]:
    n, batch, drop_last = spec["n"], spec["batch"], spec["drop_last"]
    if spec["kind"] == "iterable":
        return DataLoader(Stream(n), batch_size=batch, drop_last=drop_last)
    if spec["kind"] == "shuffled":
        return DataLoader(list(range(n)), batch_size=batch, drop_last=drop_last, shuffle=True,
                          generator=torch.Generator().manual_seed(3))
    return DataLoader(list(range(n)), batch_size=batch, drop_last=drop_last)


def _pass(spec: dict[str, Any], env: dl.Env) -> tuple[list[list[int]], list[StepInfo]]:
    """One rank's batches over a whole pass, and the layout gather_metrics would use."""
    loader = dl.shard(_make(spec), env, **spec["options"])
    batches = [b.tolist() for b in loader]
    assert len(loader) == len(batches)
    whole, steps = loader.metrics_layout()
    assert whole
    return batches, steps


def _dedup_over_dp(passes: list[tuple[list[list[int]], list[StepInfo]]]) -> list[int]:
    """What gather_metrics returns for a whole pass: the dp ranks' rows, padded to the longest
    (as the all-gather does), then only the real rows kept."""
    layout = max((steps for _, steps in passes), key=len)  # gather_metrics exchanges them
    blocks = [[i for b in batches for i in b] for batches, _ in passes]
    stride = max(len(block) for block in blocks)
    gathered = [row for block in blocks for row in block + [-1] * (stride - len(block))]
    return [gathered[i] for i in keep_index(layout, stride)]


@SETTINGS
@given(data=st.data())
def test_tp_and_cp_peers_read_identical_batches(data: st.DataObject) -> None:
    mesh = data.draw(meshes())
    spec = data.draw(loaders(mesh))
    world = mesh.world_size
    passes = [_pass(spec, fake_env(rank, world, mesh=mesh)) for rank in range(world)]
    for rank in range(world):
        for peer in mesh.group(["cp", "tp"], rank):
            assert passes[peer] == passes[rank], (mesh, rank, peer)
    # The layout is one column per data-parallel rank, not per rank.
    assert all(len(info.rows) == mesh.dp_size for _, steps in passes for info in steps)
    if spec["options"]["even_batches"]:
        assert len({len(batches) for batches, _ in passes}) == 1  # no collective hangs


@SETTINGS
@given(data=st.data())
def test_the_mesh_deals_as_a_data_parallel_job_of_dp_size_ranks(data: st.DataObject) -> None:
    """Data-parallel rank d of the mesh reads what rank d of a plain dp_size-rank job reads."""
    mesh = data.draw(meshes())
    spec = data.draw(loaders(mesh))
    plain = [_pass(spec, fake_env(d, mesh.dp_size)) for d in range(mesh.dp_size)]
    for rank in range(mesh.world_size):
        env = fake_env(rank, mesh.world_size, mesh=mesh)
        assert _pass(spec, env) == plain[mesh.dp_rank(rank)], (mesh, rank)


@SETTINGS
@given(data=st.data())
def test_dp_ranks_cover_every_index_and_the_dedup_is_exact(data: st.DataObject) -> None:
    mesh = data.draw(meshes())
    spec = data.draw(loaders(mesh))
    world, n = mesh.world_size, spec["n"]
    passes = {rank: _pass(spec, fake_env(rank, world, mesh=mesh)) for rank in range(world)}
    for rank in range(world):
        group = mesh.group(DATA_AXES, rank)  # this rank's data-parallel peers, in dp order
        assert [mesh.dp_rank(r) for r in group] == list(range(mesh.dp_size))
        mine = [passes[r] for r in group]
        kept = _dedup_over_dp(mine)
        if spec["drop_last"]:
            # Whole global batches only: a prefix of the pass, each sample once.
            per_step = spec["batch"] * (1 if spec["options"]["split_batches"] else mesh.dp_size)
            assert len(kept) == (n // per_step) * per_step
            assert len(set(kept)) == len(kept) and set(kept) <= set(range(n))
        else:
            assert sorted(kept) == list(range(n)), (mesh, spec)
            seen = {i for batches, _ in mine for b in batches for i in b}
            assert seen == set(range(n))  # the dp ranks cover every index
            if spec["kind"] != "shuffled":
                assert kept == list(range(n))  # and in dataset order


@SETTINGS
@given(mesh=meshes(), n=st.integers(0, 30), padded=st.booleans())
def test_split_between_processes_splits_over_dp_ranks(mesh: Mesh, n: int, padded: bool) -> None:
    items = list(range(n))
    chunks = []
    for rank in range(mesh.world_size):
        with dl.split_between_processes(items, fake_env(rank, mesh.world_size, mesh=mesh),
                                        apply_padding=padded) as mine:
            chunks.append(mine)
    for rank in range(mesh.world_size):
        assert all(chunks[peer] == chunks[rank] for peer in mesh.group(["cp", "tp"], rank))
    by_dp = [chunks[mesh.rank_of({"dp_replicate": d // mesh.dp_shard,
                                  "dp_shard": d % mesh.dp_shard})]
             for d in range(mesh.dp_size)]
    plain = []
    for d in range(mesh.dp_size):
        with dl.split_between_processes(items, fake_env(d, mesh.dp_size)) as mine:
            plain.append(mine)
    if not padded:
        assert [i for c in by_dp for i in c] == items
        assert by_dp == plain
    elif n and mesh.dp_size > 1:
        assert len({len(c) for c in by_dp}) == 1
        assert all(c[:len(p)] == p for c, p in zip(by_dp, plain, strict=True))
