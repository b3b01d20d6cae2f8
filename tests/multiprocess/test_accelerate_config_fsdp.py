"""The FSDP options Accelerate config files now map to, in two real gloo ranks.

One launch: the strategy comes from an Accelerate file (TRANSFORMER_BASED_WRAP without class
names, fsdp_sync_module_states, fsdp_forward_prefetch) through the launcher's plan into each
rank's Env; a second file (HYBRID_SHARD) is wrapped on one machine and on two pretended
machines. Each rank reports which modules became FSDP units, the prefetch chain, its
weights before and after wrap, and its weights after one SGD step; the parent compares them
with a one-process run of the same tiny GPT-2.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.launcher.config import read_config_file, resolve, to_plan
from distlib.testing import spawn

pytestmark = pytest.mark.multiprocess

DATA = Path(__file__).parent.parent / "data" / "accelerate"
BATCH, SEQ = 4, 8


def _model(seed: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _tokens(rank: int, world_size: int) -> torch.Tensor:
    ids = torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    per = BATCH // world_size
    return ids[rank * per:(rank + 1) * per]


def _full(model: Any) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in dl.unwrap(model).state_dict().items()}


def _step(model: Any, optimizer: Any, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    dl.backward(loss, model)
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


def _scenario(strategy: Any, env: Any, seed: int) -> dict[str, Any]:
    from torch.distributed.fsdp import FSDPModule

    model = _model(seed)
    before = _full(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = dl.wrap(model, strategy, env=env, optimizer=optimizer)
    units = sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule))
    modules = dict(model.named_modules())
    prefetch = {name: [next(n for n, m in modules.items()
                            if isinstance(m, FSDPModule) and m._get_fsdp_state() is state)
                       for state in modules[name]._get_fsdp_state()._states_to_forward_prefetch]
                for name in units}
    mesh = next(model.parameters()).device_mesh
    wrapped = _full(model)
    loss = _step(model, optimizer, _tokens(env.rank, env.world_size))
    return {"units": units, "prefetch": prefetch, "before": before, "wrapped": wrapped,
            "after": _full(model), "loss": loss, "mesh": tuple(mesh.shape)}


def _rank(env: Any, hybrid_options: dict[str, Any]) -> dict[str, Any]:
    hybrid = dl.FSDP(**hybrid_options)
    two_machines = dataclasses.replace(env, num_nodes=2, node_rank=env.rank, local_rank=0,
                                       local_world_size=1)
    return {"strategy": repr(env.strategy),
            "from_config": _scenario(env.strategy, env, seed=env.rank),
            "hybrid_one_machine": _scenario(hybrid, env, seed=0),
            "hybrid_two_machines": _scenario(hybrid, two_machines, seed=0)}


def _plan(name: str) -> Any:
    return to_plan(resolve({}, read_config_file(str(DATA / name)), {}))


def _one_process() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    model = _model(0)
    start = _full(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = _tokens(0, 1)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    return start, _full(model), float(loss.detach())


def test_fsdp_options_from_accelerate_files_in_two_ranks() -> None:
    plan = _plan("fsdp_auto_wrap_sync_prefetch.yaml")
    assert plan.strategy_options == {
        "wrap_classes": "auto", "sync_module_states": True, "forward_prefetch": True,
        "hybrid_shard": False, "reshard_after_forward": True, "state_dict_type": "sharded",
        "cpu_offload": False, "activation_checkpointing": False}
    hybrid = _plan("fsdp_hybrid_shard.yaml").strategy_options
    assert hybrid["hybrid_shard"] is True
    result = spawn(_rank, hybrid, world_size=2, timeout_s=240, strategy=plan.strategy,
                   strategy_options=plan.strategy_options)
    start, stepped, loss = _one_process()
    blocks = ["", "transformer.h.0", "transformer.h.1"]
    for rank in range(2):
        got = result[rank]
        assert "wrap_classes=('auto',)" in got["strategy"]
        config = got["from_config"]
        # TRANSFORMER_BASED_WRAP without classes: the model's _no_split_modules (GPT2Block)
        assert config["units"] == blocks
        # fsdp_forward_prefetch: each block prefetches the next block's all-gather
        assert config["prefetch"]["transformer.h.0"] == ["transformer.h.1"]
        assert config["prefetch"]["transformer.h.1"] == []
        # fsdp_sync_module_states: rank 1 started from seed 1 and ends up with rank 0's weights
        for key, value in start.items():
            torch.testing.assert_close(config["wrapped"][key], value)
        for key, value in stepped.items():
            torch.testing.assert_close(config["after"][key], value, atol=1e-5, rtol=1e-4)
        for name, mesh in (("hybrid_one_machine", (1, 2)), ("hybrid_two_machines", (2, 1))):
            assert got[name]["mesh"] == mesh
            assert got[name]["units"] == [""]  # NO_WRAP: the root only
            assert got[name]["prefetch"] == {"": []}
            for key, value in stepped.items():
                torch.testing.assert_close(got[name]["after"][key], value, atol=1e-5,
                                           rtol=1e-4)
    differs = any(not torch.equal(result[1]["from_config"]["before"][k], v)
                  for k, v in start.items())
    assert differs, "rank 1 must start from different weights for the sync to be tested"
    mean_loss = (result[0]["from_config"]["loss"] + result[1]["from_config"]["loss"]) / 2
    assert mean_loss == pytest.approx(loss, rel=1e-5)
