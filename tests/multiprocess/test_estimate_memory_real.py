"""The estimate against a real run: two gloo ranks train one AdamW step under DDP, then FSDP2.

Each rank sums the bytes it really holds after the step — its parameters (an FSDP2 shard's
local tensor), their ``.grad`` and every optimizer state tensor — and the estimate that
`estimate_memory` gives for the same model and 2 ranks in fp32 must be within 10% of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.cli.estimate_memory import estimate_memory
from distlib.testing import spawn

pytestmark = pytest.mark.multiprocess

VOCAB = 256


def build() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def _bytes(tensor: Any) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return int(local.numel() * local.element_size())


def _one_step(env: dl.Env, strategy: str) -> dict[str, int]:
    env = dataclasses.replace(env, strategy=dl.DDP() if strategy == "ddp" else dl.FSDP())
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = dl.wrap(model, env, optimizer=optimizer)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(env.rank))
    dl.backward(model(input_ids=ids, labels=ids).loss, model)
    optimizer.step()
    params = list(model.parameters())
    states = [v for state in optimizer.state.values() for v in state.values()
              if isinstance(v, torch.Tensor)]
    return {"parameters": sum(_bytes(p) for p in params),
            "gradients": sum(_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(_bytes(s) for s in states), "num_states": len(states)}


def _both(env: dl.Env) -> dict[str, dict[str, int]]:
    return {name: _one_step(env, name) for name in ("ddp", "fsdp")}


@pytest.fixture(scope="module")
def measured() -> dict[int, dict[str, dict[str, int]]]:
    return spawn(_both, world_size=2, timeout_s=240).returns  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def estimated() -> dict[str, Any]:
    with dl.init_empty_weights():
        model = build()
    row = estimate_memory(model, num_processes=2, dtypes=["float32"]).rows[0]
    return {m.strategy: m for m in row.strategies}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_estimate_is_within_10_percent_of_the_real_run(
        measured: dict[int, dict[str, dict[str, int]]], estimated: dict[str, Any],
        strategy: str) -> None:
    plan = estimated[strategy]
    for rank in (0, 1):
        got = measured[rank][strategy]
        assert got["num_states"] > 0 and got["gradients"] > 0  # the step really ran
        real = got["parameters"] + got["gradients"] + got["optimizer"]
        assert abs(plan.total_bytes - real) <= 0.10 * real, (strategy, rank, plan, got)
        for kind, estimate in (("parameters", plan.param_bytes), ("gradients", plan.grad_bytes),
                               ("optimizer", plan.optimizer_bytes)):
            assert abs(estimate - got[kind]) <= 0.10 * got[kind], (strategy, rank, kind, got)


def test_fsdp_holds_about_half_of_ddp(measured: dict[int, dict[str, dict[str, int]]],
                                      estimated: dict[str, Any]) -> None:
    # what the estimate's columns say (sharding halves every kind on 2 ranks) is what ran
    ddp = sum(measured[0]["ddp"][k] for k in ("parameters", "gradients", "optimizer"))
    fsdp = sum(measured[0]["fsdp"][k] for k in ("parameters", "gradients", "optimizer"))
    assert 0.45 < fsdp / ddp < 0.55
    assert 0.45 < estimated["fsdp"].total_bytes / estimated["ddp"].total_bytes < 0.55
