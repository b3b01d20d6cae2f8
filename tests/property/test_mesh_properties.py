"""`Mesh` (distlib.topology): rank <-> coordinates, groups and the data-parallel rank, for any sizes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distlib.errors import ConfigError
from distlib.topology import AXES, Mesh, parse_mesh

sizes = st.fixed_dictionaries({a: st.integers(1, 4) for a in AXES})


@given(sizes)
def test_coordinates_and_rank_of_are_inverse(s: dict[str, int]) -> None:
    mesh = Mesh(**s)
    assert mesh.world_size == math.prod(s.values())
    seen = set()
    for rank in range(mesh.world_size):
        c = mesh.coordinates(rank)
        assert mesh.rank_of(c) == rank
        seen.add(tuple(c.values()))
    assert len(seen) == mesh.world_size


@settings(deadline=None, max_examples=60)
@given(sizes, st.sampled_from([["tp"], ["cp"], ["dp_replicate", "dp_shard"], ["cp", "tp"],
                               ["dp_shard"], list(AXES)]))
def test_groups_partition_the_world(s: dict[str, int], axes: list[str]) -> None:
    mesh = Mesh(**s)
    groups = mesh.groups(axes)
    flat = sorted(r for g in groups for r in g)
    assert flat == list(range(mesh.world_size))
    assert {len(g) for g in groups} == {math.prod(s[a] for a in axes)}
    for g in groups:
        for rank in g:
            assert mesh.group(axes, rank) == g


@settings(deadline=None, max_examples=60)
@given(sizes)
def test_ranks_of_one_tp_cp_group_share_the_data_parallel_rank(s: dict[str, int]) -> None:
    mesh = Mesh(**s)
    assert sorted({mesh.dp_rank(r) for r in range(mesh.world_size)}) == list(range(mesh.dp_size))
    for group in mesh.groups(["cp", "tp"]):
        assert len({mesh.dp_rank(r) for r in group}) == 1
    for group in mesh.groups(["dp_replicate", "dp_shard"]):
        assert sorted(mesh.dp_rank(r) for r in group) == list(range(mesh.dp_size))


@given(sizes, st.sampled_from(AXES))
def test_one_inferred_axis_resolves_to_the_world(s: dict[str, int], axis: str) -> None:
    world = math.prod(s.values())
    mesh = Mesh(**{**s, axis: -1}).resolve(world)
    assert mesh == Mesh(**s)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: Mesh(tp=0), "tp must be a positive int or -1"),
    (lambda: Mesh(cp=True), "cp must be a positive int"),
    (lambda: Mesh(dp_shard=-1, tp=-1), "at most one axis may be -1"),
    (lambda: Mesh(dp_shard=2, tp=2).resolve(8), "product of the axis sizes must equal"),
    (lambda: Mesh(tp=3).resolve(8), "must divide the world size"),
    (lambda: Mesh(tp=2).coordinates(0), "must be resolved"),
    (lambda: Mesh(dp_shard=2).coordinates(2), r"rank must be in \[0, 2\)"),
    (lambda: Mesh(dp_shard=2).rank_of({"tp": 1}), r"tp coordinate must be in \[0, 1\)"),
    (lambda: Mesh(dp_shard=2).group(["pp"], 0), "axes must be among"),
    (lambda: parse_mesh("dp=2"), "AXIS=SIZE pairs"),
    (lambda: parse_mesh("tp=2,tp=4"), "given once"),
])
def test_bad_meshes_are_refused(make: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()  # type: ignore[operator]


def test_parse_and_show() -> None:
    assert parse_mesh("dp-shard=2, tp=2") == Mesh(dp_shard=2, tp=2)
    assert parse_mesh("tp=-1") == Mesh(dp_shard=1, tp=-1)
    assert str(Mesh(dp_replicate=2, dp_shard=2, tp=2)) == "dp_replicate=2 x dp_shard=2 x tp=2"


def test_an_env_rebuilt_for_another_world_size_infers_the_axis_again() -> None:
    import dataclasses

    import distlib as dl

    env = dl.Env(world_size=4, rank=1, local_world_size=4, local_rank=1, mesh=Mesh(tp=2))
    assert env.mesh == Mesh(dp_shard=2, tp=2)
    wider = dataclasses.replace(env, world_size=8, local_world_size=8)
    assert wider.mesh == Mesh(dp_shard=4, tp=2)
    with pytest.raises(ConfigError, match="product of the axis sizes"):
        dl.Env(world_size=4, mesh=Mesh(dp_shard=2, tp=1))
