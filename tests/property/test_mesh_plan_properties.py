"""Properties of the mesh planner over Llama configs and meshes: what the ranks hold adds up to
the model, and more shards never mean more bytes per rank."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from distlib.topology import Mesh
from distlib.training.plan import ParallelPlan, plan_parallelism

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def configs(draw: Any, tp: int) -> dict[str, Any]:
    """A Llama config whose every tensor-parallel size divides by ``tp`` (and so by its
    divisors): heads, kv heads, MLP width and vocabulary; an odd number of rows elsewhere is
    fine (FSDP2 pads)."""
    kv = tp * draw(st.integers(1, 2))
    heads = kv * draw(st.integers(1, 3))
    return {"model_type": draw(st.sampled_from(["llama", "mistral", "qwen2"])),
            "hidden_size": heads * draw(st.sampled_from([2, 4, 6])),
            "num_hidden_layers": draw(st.integers(1, 3)),
            "num_attention_heads": heads, "num_key_value_heads": kv,
            "intermediate_size": tp * draw(st.integers(1, 20)),
            "vocab_size": tp * draw(st.integers(1, 30)),
            "tie_word_embeddings": draw(st.booleans()),
            "attention_bias": draw(st.booleans()), "mlp_bias": draw(st.booleans())}


meshes = st.builds(lambda r, s, c, t: Mesh(dp_replicate=r, dp_shard=s, cp=c, tp=t),
                   st.integers(1, 2), st.integers(1, 5), st.integers(1, 2),
                   st.sampled_from([1, 2, 4]))


def _replicated_bytes(plan: ParallelPlan) -> int:
    return sum(t.numel * t.itemsize for t in plan.tensors if t.tp_dim is None)


@SETTINGS
@given(data=st.data(), mesh=meshes)
def test_the_ranks_hold_the_whole_model(data: st.DataObject, mesh: Mesh) -> None:
    plan = plan_parallelism(data.draw(configs(mesh.tp)), mesh)
    for t in plan.tensors:
        local = math.prod(t.local_shape)
        assert local * (mesh.tp if t.tp_dim is not None else 1) == t.numel
        held = [t.held_numel(i, mesh.dp_shard) for i in range(mesh.dp_shard)]
        assert sum(held) == local and max(held) <= t.rank_numel
    # one replica's ranks (a dp_shard x tp block) hold the model once, norms once per tp rank
    block = [r for r in range(plan.mesh.world_size)
             if plan.mesh.coordinates(r)["dp_replicate"] == plan.mesh.coordinates(r)["cp"] == 0]
    held = sum(plan.held_param_bytes(r) for r in block)
    assert held == plan.total_param_bytes + (mesh.tp - 1) * _replicated_bytes(plan)
    everyone = sum(plan.held_param_bytes(r) for r in range(plan.mesh.world_size))
    assert everyone == mesh.dp_replicate * mesh.cp * held
    # the sharded tensors' bytes over the block are exactly the model's (the brief's invariant)
    sharded = sum(t.numel * t.itemsize for t in plan.tensors if t.tp_dim is not None)
    assert held - mesh.tp * _replicated_bytes(plan) == sharded
    # every rank allocates at least what it holds; FSDP2 pads less than one row per rank
    assert all(plan.param_bytes >= plan.held_param_bytes(r) for r in block)
    for t in plan.tensors:
        row = math.prod(t.local_shape[1:])
        assert 0 <= t.rank_numel * mesh.dp_shard - math.prod(t.local_shape) < mesh.dp_shard * row
    assert plan.checks[0] == f"world size {mesh.world_size} = {mesh}"


@SETTINGS
@given(data=st.data(), mesh=meshes, optimizer=st.sampled_from(["adamw", "sgd_momentum", "sgd"]))
def test_more_shards_never_mean_more_bytes(data: st.DataObject, mesh: Mesh,
                                           optimizer: str) -> None:
    config = data.draw(configs(4))  # every tp in {1, 2, 4} divides it
    base = plan_parallelism(config, mesh, optimizer=optimizer)
    for axis in ("dp_shard", "tp"):
        more = dataclasses.replace(mesh, **{axis: getattr(mesh, axis) * 2})
        if more.tp > 4:
            continue
        bigger = plan_parallelism(config, more, optimizer=optimizer)
        assert bigger.param_bytes <= base.param_bytes
        assert bigger.grad_bytes <= base.grad_bytes
        assert bigger.optimizer_bytes <= base.optimizer_bytes
        assert bigger.total_param_bytes == base.total_param_bytes
        assert bigger.num_parameters == base.num_parameters
    # replicating axes never change what a rank holds
    for axis in ("dp_replicate", "cp"):
        wider = plan_parallelism(config, dataclasses.replace(mesh, **{axis: 3}), optimizer=optimizer)
        assert (wider.param_bytes, wider.grad_bytes, wider.optimizer_bytes) == (
            base.param_bytes, base.grad_bytes, base.optimizer_bytes)
    # one process holds the whole model
    alone = plan_parallelism(config, Mesh(dp_shard=1), optimizer=optimizer)
    assert alone.param_bytes == alone.total_param_bytes >= base.param_bytes
