"""Hypothesis over the launcher's pure cores: process counts, child environments, settings."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distlib.env import Hardware, detect
from distlib.errors import ConfigError
from distlib.launcher._environ import DISTLIB_VARIABLES, child_environ
from distlib.launcher.config import resolve, validate
from distlib.launcher.plan import LaunchPlan, plan_launch
from distlib.launcher.settings import SETTINGS
from tests.generators import world_and_rank

names = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ_"), min_size=1, max_size=12)
values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                 max_size=20)


@given(total=st.integers(1, 64), machines=st.integers(1, 8))
def test_process_counts_split_evenly_or_fail(total: int, machines: int) -> None:
    port = 29400 if machines > 1 else 0
    if total % machines:
        with pytest.raises(ConfigError, match="multiple"):
            plan_launch(num_processes=total, num_machines=machines, main_port=port)
        return
    plan = plan_launch(num_processes=total, num_machines=machines, main_port=port)
    assert plan.world_size == total and plan.nproc_per_node * machines == total


plans = st.builds(
    LaunchPlan, nproc_per_node=st.none() | st.integers(1, 8), cpu=st.booleans(),
    debug=st.booleans(), precision=st.none() | st.sampled_from(["no", "fp16", "bf16", "fp8"]),
    strategy=st.none() | st.sampled_from(["single", "ddp", "fsdp", "deepspeed"]),
    collective_timeout_s=st.none() | st.integers(1, 10_000),
    gpu_ids=st.none() | st.sampled_from(["all", "0", "0,1"]))


@given(base=st.dictionaries(names, values, max_size=8), plan=plans)
def test_child_environ_keeps_the_base_and_owns_only_its_variables(base, plan) -> None:
    frozen = dict(base)
    env = child_environ(base, plan)
    assert base == frozen  # never mutated
    assert env["DISTLIB_LAUNCHED"] == "1"
    owned = set(DISTLIB_VARIABLES) | {"CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "PYTHONPATH"}
    for key, value in base.items():
        if key not in owned:
            assert env[key] == value
    assert ("DISTLIB_CPU" in env) == plan.cpu and ("DISTLIB_DEBUG" in env) == plan.debug
    assert env.get("DISTLIB_PRECISION") == plan.precision
    assert env.get("DISTLIB_STRATEGY") == plan.strategy
    if plan.strategy is not None:
        assert json.loads(env["DISTLIB_STRATEGY_OPTIONS"]) == {}


@given(plan=plans, world_rank=world_and_rank())
def test_detect_in_a_child_reads_back_the_plan(plan, world_rank) -> None:
    world, rank = world_rank
    environ = child_environ({}, plan) | {"RANK": str(rank), "WORLD_SIZE": str(world),
                                         "MASTER_PORT": "29401"}
    if plan.strategy == "single" and world > 1:
        return  # a single-process strategy in a bigger world is the user's choice to make
    env = detect(environ, hardware=Hardware(num_gpus=2))
    assert (env.rank, env.world_size, env.launcher) == (rank, world, "distlib")
    assert env.debug == plan.debug
    assert env.device == ("cpu" if plan.cpu else f"cuda:{env.local_rank % 2}")
    if plan.precision is not None:
        assert str(env.precision) == plan.precision
    if plan.strategy is not None:
        assert env.strategy.name == plan.strategy
    if plan.collective_timeout_s is not None:
        assert env.timeout_s == plan.collective_timeout_s


@given(flag=st.none() | st.integers(0, 5), config=st.none() | st.integers(0, 5),
       environ=st.none() | st.sampled_from(["1", "0"]))
def test_precedence_is_flag_then_config_then_environment_then_default(flag, config,
                                                                      environ) -> None:
    got = resolve({"max_restarts": flag, "debug": None if flag is None else bool(flag)},
                  {"max_restarts": config, "debug": None if config is None else bool(config)},
                  {} if environ is None else {"DISTLIB_DEBUG": environ})
    expected = flag if flag is not None else config if config is not None else 0
    assert got["max_restarts"][0] == expected
    source = got["debug"][1]
    if flag is not None:
        assert source == "flag"
    elif config is not None:
        assert source == "config file"
    elif environ is not None:
        assert source == "environment (DISTLIB_DEBUG)" and got["debug"][0] == (environ == "1")
    else:
        assert source == "default"


@given(key=names.map(str.lower), value=st.integers() | st.text(max_size=5))
def test_unknown_keys_are_named(key: str, value) -> None:
    if key in SETTINGS:
        return
    with pytest.raises(ConfigError) as info:
        validate({key: value}, "config")
    assert f"`{key}`" in str(info.value)


def test_os_environ_is_untouched_by_planning() -> None:
    before = dict(os.environ)
    child_environ(os.environ, LaunchPlan(cpu=True, strategy="ddp"))
    assert dict(os.environ) == before


# ---- the mesh: what the launcher plans is what every rank detects ------------------------

axis_sizes = st.none() | st.integers(1, 4)


@given(world=st.integers(1, 16), dp_replicate=axis_sizes, dp_shard=axis_sizes, cp=axis_sizes,
       tp=axis_sizes)
def test_the_launcher_refuses_exactly_the_meshes_the_ranks_would(world, dp_replicate, dp_shard,
                                                                 cp, tp) -> None:
    from distlib.launcher.config import to_plan
    from distlib.topology import AXES

    flags = {"num_processes": world, "dp_replicate_size": dp_replicate,
             "dp_shard_size": dp_shard, "cp_size": cp, "tp_size": tp}
    given_sizes = {a: v for a, v in zip(AXES, (dp_replicate, dp_shard, cp, tp), strict=True)
                   if v is not None}
    known = 1
    for size in given_sizes.values():
        known *= size
    fits = (known == world) if "dp_shard" in given_sizes else (world % known == 0)
    try:
        plan = to_plan(resolve(flags, {}, {}))
    except ConfigError as error:
        assert not fits and "must multiply to the number of processes" in str(error)
        return
    assert fits
    if not given_sizes:
        assert plan.mesh is None and "DISTLIB_MESH" not in child_environ({}, plan)
        return
    assert plan.mesh is not None and plan.mesh.world_size == world
    expected = {a: given_sizes.get(a, 1) for a in AXES}
    if "dp_shard" not in given_sizes:
        expected["dp_shard"] = world // known  # inferred: the ranks the others leave
    assert plan.mesh.sizes == expected
    environ = child_environ({}, plan) | {"MASTER_PORT": "29401", "WORLD_SIZE": str(world)}
    seen = set()
    for rank in range(world):
        env = detect(environ | {"RANK": str(rank)}, hardware=Hardware())
        assert env.mesh == plan.mesh
        place = env.mesh.coordinates(rank)
        assert env.mesh.rank_of(place) == rank
        seen.add(tuple(place.values()))
    assert len(seen) == world  # every rank at its own coordinates


@given(flag=axis_sizes, config=axis_sizes, environ=axis_sizes)
def test_each_axis_is_flag_then_config_then_environment_then_inferred(flag, config,
                                                                      environ) -> None:
    got = resolve({"tp_size": flag}, {"tp_size": config},
                  {} if environ is None else {"DISTLIB_MESH": f"tp={environ}"})
    value, source = got["tp_size"]
    if flag is not None:
        assert (value, source) == (flag, "flag")
    elif config is not None:
        assert (value, source) == (config, "config file")
    elif environ is not None:
        assert (value, source) == (environ, "environment (DISTLIB_MESH)")
    else:
        assert (value, source) == (None, "default")
