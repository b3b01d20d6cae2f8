"""The estimate against a real run: two gloo ranks train one AdamW step under DDP, FSDP2 and
DeepSpeed ZeRO stages 1, 2 and 3.

Each rank sums the bytes it really holds after the step — its parameters (an FSDP2 shard's
local tensor), their ``.grad`` and every optimizer state tensor — and the estimate that
`estimate_memory` gives for the same model and 2 ranks in fp32 must be within 10% of it.
Under DeepSpeed the rank's bytes are read inside the inner optimizer's step, where the most
is alive: the model's parameters (stage 3: each one's ``ds_tensor`` partition), the fp32
master partition and its gradient, DeepSpeed's gradient partition buffers and the states,
each storage counted once.
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


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []


class _Storages:
    """Bytes by kind, each storage counted once (the first kind that names it keeps it)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes = {"parameters": 0, "gradients": 0, "optimizer": 0}

    def add(self, kind: str, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                self.bytes[kind] += storage.nbytes()


def _zero_step(env: dl.Env, stage: int) -> dict[str, int]:
    env = dataclasses.replace(env, strategy=dl.DeepSpeed(zero_stage=stage))
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = dl.wrap(model, env, optimizer=optimizer)
    zero = optimizer.engine.optimizer  # DeepSpeedZeroOptimizer or ..._Stage3
    inner, found = zero.optimizer, _Storages()
    step, seen = inner.step, {}

    def measuring_step(*args: Any, **kwargs: Any) -> Any:
        params = list(optimizer.engine.module.parameters())
        masters = [p for group in inner.param_groups for p in group["params"]]
        found.add("parameters", [getattr(p, "ds_tensor", p) for p in params] + params)
        found.add("gradients", [p.grad for p in masters + params if p.grad is not None])
        found.add("gradients", _tensors([getattr(zero, name, None) for name in (
            "grads_in_partition", "grad_partitions_flat_buffer", "averaged_gradients")]))
        found.add("optimizer", masters)
        out = step(*args, **kwargs)
        found.add("optimizer", _tensors(list(inner.state.values())))
        seen["states"] = sum(len(_tensors(list(s.values()))) for s in inner.state.values())
        return out

    inner.step = measuring_step
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(env.rank))
    dl.backward(model(input_ids=ids, labels=ids).loss, model)
    optimizer.step()
    return {**found.bytes, "num_states": seen.get("states", 0),
            "stage": int(optimizer.engine.zero_optimization_stage())}


@pytest.fixture(scope="module")
def measured() -> dict[int, dict[str, dict[str, int]]]:
    return spawn(_both, world_size=2, timeout_s=240).returns  # type: ignore[no-any-return]


def _zero_stages(env: dl.Env) -> dict[str, dict[str, int]]:
    return {f"zero{stage}-{dtype}": _zero_step(dataclasses.replace(env, precision=precision),
                                                stage)
            for dtype, precision in (("float32", "no"), ("bf16-mixed", "bf16"))
            for stage in (1, 2, 3)}


@pytest.fixture(scope="module")
def zero_measured() -> dict[int, dict[str, dict[str, int]]]:
    return spawn(_zero_stages, world_size=2, timeout_s=400).returns  # type: ignore[no-any-return]


def _estimate(dtype: str) -> dict[str, Any]:
    with dl.init_empty_weights():
        model = build()
    row = estimate_memory(model, num_processes=2, dtypes=[dtype]).rows[0]
    return {m.strategy: m for m in row.strategies}


@pytest.fixture(scope="module")
def estimated() -> dict[str, Any]:
    return _estimate("float32")


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


@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_the_zero_estimate_is_within_10_percent_of_deepspeed(
        zero_measured: dict[int, dict[str, dict[str, int]]], strategy: str,
        dtype: str) -> None:
    plan = _estimate(dtype)[strategy]
    for rank in (0, 1):
        got = zero_measured[rank][f"{strategy}-{dtype}"]
        assert got["stage"] == int(strategy[-1]) and got["num_states"] == 3  # one flat Adam
        real = got["parameters"] + got["gradients"] + got["optimizer"]
        assert abs(plan.total_bytes - real) <= 0.10 * real, (strategy, rank, plan, got)
        for kind, estimate in (("parameters", plan.param_bytes), ("gradients", plan.grad_bytes),
                               ("optimizer", plan.optimizer_bytes)):
            assert abs(estimate - got[kind]) <= 0.10 * got[kind], (strategy, rank, kind, got)


def test_zero_partitions_what_its_stage_says(
        zero_measured: dict[int, dict[str, dict[str, int]]],
        measured: dict[int, dict[str, dict[str, int]]]) -> None:
    model = measured[0]["ddp"]["parameters"]  # the fp32 model's bytes
    zero = {name.removesuffix("-float32"): got for name, got in zero_measured[0].items()
            if name.endswith("-float32")}
    half = {name.removesuffix("-bf16-mixed"): got for name, got in zero_measured[0].items()
            if name.endswith("-bf16-mixed")}
    # stages 1 and 2 keep the whole model, stage 3 half of it (bf16: half as many bytes);
    # every stage half the states plus an fp32 master half of the model (a copy even in fp32)
    assert zero["zero1"]["parameters"] == zero["zero2"]["parameters"] == model
    assert zero["zero3"]["parameters"] == model // 2
    assert half["zero1"]["parameters"] == half["zero2"]["parameters"] == model // 2
    assert half["zero3"]["parameters"] == model // 4
    for got in (*zero.values(), *half.values()):
        assert got["optimizer"] == pytest.approx(1.5 * model, rel=0.01)
    # the gradients at the step: this rank's fp32 partition, in every stage (1 included);
    # stage 3 also keeps its gradient partition buffer in the parameters' dtype
    for got in (zero, half):
        assert got["zero1"]["gradients"] == got["zero2"]["gradients"] == model // 2
    assert zero["zero3"]["gradients"] == model
    assert half["zero3"]["gradients"] == model // 2 + model // 4
