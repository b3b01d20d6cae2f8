"""Property tests for SLURM's compressed notations and for Env validation."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from distlib._slurm import expand_nodelist, expand_tasks_per_node
from distlib.env import Env, Hardware, detect
from distlib.errors import EnvError

prefixes = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=6).filter(
    lambda p: not p[-1].isdigit())


@st.composite
def host_groups(draw: st.DrawFn) -> tuple[str, list[str]]:
    """One 'prefix[ranges]' entry and the hosts it stands for."""
    prefix = draw(prefixes)
    width = draw(st.integers(1, 4))
    numbers = sorted(draw(st.sets(st.integers(0, 10**width - 1), min_size=1, max_size=12)))
    runs: list[list[int]] = []
    for n in numbers:
        if runs and runs[-1][-1] == n - 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    ranges = [f"{r[0]:0{width}d}" if len(r) == 1 else f"{r[0]:0{width}d}-{r[-1]:0{width}d}"
              for r in runs]
    hosts = [f"{prefix}{n:0{width}d}" for n in numbers]
    if len(numbers) == 1 and draw(st.booleans()):
        return hosts[0], hosts  # plain host name, no brackets
    return f"{prefix}[{','.join(ranges)}]", hosts


@given(st.lists(host_groups(), min_size=1, max_size=5))
def test_nodelist_expansion_inverts_compression(groups: list[tuple[str, list[str]]]) -> None:
    text = ",".join(g for g, _ in groups)
    expected = [h for _, hosts in groups for h in hosts]
    assert expand_nodelist(text) == expected


@given(prefixes, st.integers(1, 3), st.integers(1, 3))
def test_nodelist_with_two_bracket_groups_is_a_product(prefix: str, a: int, b: int) -> None:
    text = f"{prefix}[1-{a}]-n[1-{b}]"
    expected = [f"{prefix}{i}-n{j}" for i, j in itertools.product(range(1, a + 1),
                                                                   range(1, b + 1))]
    assert expand_nodelist(text) == expected


@given(st.text(alphabet="ab[],-0123456789", max_size=12))
def test_nodelist_garbage_raises_env_error_or_expands(text: str) -> None:
    try:
        hosts = expand_nodelist(text)
    except EnvError as exc:
        assert "SLURM_JOB_NODELIST" in str(exc)
    else:
        assert hosts and all(hosts)


@given(st.lists(st.tuples(st.integers(1, 64), st.integers(1, 5)), min_size=1, max_size=6))
def test_tasks_per_node_expansion(runs: list[tuple[int, int]]) -> None:
    text = ",".join(f"{c}(x{r})" if r > 1 else str(c) for c, r in runs)
    assert expand_tasks_per_node(text) == [c for c, r in runs for _ in range(r)]


small = st.integers(-2, 9)


@given(rank=small, world_size=small, local_rank=small, local_world_size=small,
       node_rank=small, num_nodes=small, port=st.integers(-1, 70000))
def test_env_is_valid_exactly_when_the_rules_hold(rank: int, world_size: int, local_rank: int,
                                                  local_world_size: int, node_rank: int,
                                                  num_nodes: int, port: int) -> None:
    fields = dict(rank=rank, world_size=world_size, local_rank=local_rank,
                  local_world_size=local_world_size, node_rank=node_rank, num_nodes=num_nodes,
                  master_port=port)
    valid = (0 <= rank < world_size and 0 <= local_rank < local_world_size <= world_size
             and 0 <= node_rank < num_nodes and 1 <= port <= 65535)
    try:
        env = Env(**fields)
    except EnvError:
        assert not valid
    else:
        assert valid and (env.rank, env.world_size) == (rank, world_size)


@given(world_size=st.integers(1, 64), data=st.data())
def test_torchrun_variables_round_trip(world_size: int, data: st.DataObject) -> None:
    rank = data.draw(st.integers(0, world_size - 1))
    environ = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1000"}
    env = detect(environ, hardware=Hardware())
    assert (env.rank, env.world_size, env.node_rank, env.num_nodes) == (
        rank, world_size, rank, world_size)


sizes = st.integers(1, 3)


@given(dp_replicate=sizes, dp_shard=sizes, cp=sizes, tp=sizes, world=st.integers(1, 81),
       data=st.data())
def test_distlib_mesh_is_read_back_or_refused_naming_the_variable(
        dp_replicate: int, dp_shard: int, cp: int, tp: int, world: int,
        data: st.DataObject) -> None:
    import pytest

    from distlib.topology import Mesh

    text = f"dp_replicate={dp_replicate},dp_shard={dp_shard},cp={cp},tp={tp}"
    product = dp_replicate * dp_shard * cp * tp
    world = product if data.draw(st.booleans()) else world  # half the cases fit
    rank = data.draw(st.integers(0, world - 1))
    environ = {"RANK": str(rank), "WORLD_SIZE": str(world), "DISTLIB_MESH": text}
    if product != world:
        with pytest.raises(EnvError) as info:
            detect(environ, hardware=Hardware())
        assert "DISTLIB_MESH" in str(info.value) and repr(text) in str(info.value)
        return
    env = detect(environ, hardware=Hardware())
    assert env.mesh == Mesh(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp)
    assert env.mesh.rank_of(env.mesh.coordinates(rank)) == rank
    assert 0 <= env.mesh.dp_rank(rank) < env.mesh.dp_size == dp_replicate * dp_shard
