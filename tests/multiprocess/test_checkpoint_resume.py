"""Exact resume over 2 gloo ranks: 2N steps straight == N steps, save, new job, load, N steps.

Two launches cover every strategy: the first trains straight and saves half-way, the second
(a new job, fresh processes) loads and finishes. Weights, optimizer state and the batches each
rank saw must be identical, bitwise. The first launch also exports an FSDP2 GPT-2 to
safetensors, which the parent loads with transformers and with distlib's loader.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import pytest
import torch
import torch._dynamo

import distlib as dl
from distlib.testing import spawn

pytestmark = pytest.mark.multiprocess

N = 3  # steps before and after the save (of 8 per rank in the epoch)
STRATEGIES = {
    "ddp-fp16": (dl.DDP(), "fp16"),
    "fsdp": (dl.FSDP(), "no"),
    "zero2": (dl.DeepSpeed(zero_stage=2), "no"),
    "zero3": (dl.DeepSpeed(zero_stage=3), "no"),
}


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2))


def _setup(name: str, env: Any, seed: int) -> tuple[Any, Any, Any]:
    strategy, precision = STRATEGIES[name]
    env = dataclasses.replace(env, precision=precision)
    model = _net(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = dl.wrap(model, strategy, env=env, optimizer=optimizer)
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=g),
                                          torch.randn(64, 2, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(11))
    return model, optimizer, dl.shard(loader, env)


def _steps(model: Any, optimizer: Any, loader: Any, steps: int) -> list[float]:
    seen = []
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(model(x), y) + 1e-3 * torch.randn(()).item()
        dl.backward(loss, model)
        optimizer.step()
        optimizer.zero_grad()
        seen.append(float(x[0, 0]))
        if len(seen) == steps:
            break
    return seen


def _weights(model: Any) -> dict[str, torch.Tensor]:
    inner = dl.unwrap(model)
    params = list(inner.parameters())
    if hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().clone() for k, v in inner.state_dict().items()}
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in inner.state_dict().items()}


def _first_job(env: Any, folder: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in STRATEGIES:
        torch.manual_seed(100 + env.rank)
        model, optimizer, loader = _setup(name, env, seed=0)
        seen = _steps(model, optimizer, loader, 2 * N)
        out[f"{name}/straight"] = (_weights(model), seen)
        torch.manual_seed(100 + env.rank)
        model, optimizer, loader = _setup(name, env, seed=0)
        seen = _steps(model, optimizer, loader, N)
        dl.save_state(pathlib.Path(folder) / name, env, model=model, optimizer=optimizer,
                      loader=loader, step=N)
        out[f"{name}/first-half"] = seen
    out["export"] = _export_fsdp_gpt2(env, folder)
    return out


def _second_job(env: Any, folder: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in STRATEGIES:
        torch.manual_seed(999)  # anything: load_state restores each rank's RNG
        model, optimizer, loader = _setup(name, env, seed=42)  # other weights until loaded
        values = dl.load_state(pathlib.Path(folder) / name, env, model=model,
                               optimizer=optimizer, loader=loader)
        seen = _steps(model, optimizer, loader, N)
        out[name] = (_weights(model), seen, values)
    return out


def _gpt2_config() -> Any:
    from transformers import GPT2Config

    return GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=16)


def _export_fsdp_gpt2(env: Any, folder: str) -> str:
    from transformers import GPT2LMHeadModel

    from distlib.checkpoint import export_weights

    torch.manual_seed(5)
    model = dl.wrap(GPT2LMHeadModel(_gpt2_config()), dl.FSDP(), env=env)
    return str(export_weights(model, pathlib.Path(folder) / "gpt2", env, max_shard_size=10_000))


def test_resume_is_exact_for_every_strategy(tmp_path: pathlib.Path) -> None:
    first = spawn(_first_job, str(tmp_path), world_size=2, timeout_s=600)
    second = spawn(_second_job, str(tmp_path), world_size=2, timeout_s=600)
    for rank in range(2):
        for name in STRATEGIES:
            weights, seen = first[rank][f"{name}/straight"]
            resumed, seen_after, values = second[rank][name]
            assert values == {"step": N}
            assert first[rank][f"{name}/first-half"] + seen_after == seen, (rank, name)
            assert weights.keys() == resumed.keys()
            for key in weights:
                assert torch.equal(weights[key], resumed[key]), (rank, name, key)
    # the two ranks saw different batches (the loader really was sharded)
    assert first[0]["fsdp/straight"][1] != first[1]["fsdp/straight"][1]

    from transformers import GPT2LMHeadModel

    export = pathlib.Path(first[0]["export"])
    assert (export / "model.safetensors.index.json").exists()
    torch.manual_seed(5)
    reference = GPT2LMHeadModel(_gpt2_config()).eval()
    _gpt2_config().save_pretrained(export)
    loaded = GPT2LMHeadModel.from_pretrained(export).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(loaded(ids).logits, reference(ids).logits)
    with dl.init_empty_weights():
        empty = GPT2LMHeadModel(_gpt2_config())
    dl.load_checkpoint(empty, export)
    empty.tie_weights()
    assert empty.lm_head.weight is empty.transformer.wte.weight
    assert torch.equal(empty.eval()(ids).logits, reference(ids).logits)
