"""Exact resume over 2 gloo ranks: 2N steps straight == N steps, save, new job, load, N steps.

Two launches cover every strategy: the first trains straight and saves half-way, the second
(a new job, fresh processes) loads and finishes. Weights, optimizer state and the batches each
rank saw must be identical, bitwise. Where transformers is installed, the first launch also
exports an FSDP2 GPT-2 to safetensors, which the parent loads with transformers and with
distlib's loader (without transformers only that test is skipped).
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from typing import Any

import pytest
import torch
import torch._dynamo

import distlib as dl
from distlib.testing import spawn
from tests.models import net, shuffled_loader, train_steps, weights

pytestmark = pytest.mark.multiprocess

N = 3  # steps before and after the save (of 8 per rank in the epoch)
STRATEGIES = {
    "ddp-fp16": (dl.DDP(), "fp16"),
    "fsdp": (dl.FSDP(), "no"),
    "zero2": (dl.DeepSpeed(zero_stage=2), "no"),
    "zero3": (dl.DeepSpeed(zero_stage=3), "no"),
}


def _net(seed: int) -> torch.nn.Module:
    return net(6, 12, 2, seed=seed, hidden="tanh")


def _setup(name: str, env: Any, seed: int) -> tuple[Any, Any, Any]:
    strategy, precision = STRATEGIES[name]
    env = dataclasses.replace(env, precision=precision)
    model = _net(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = dl.wrap(model, strategy, env=env, optimizer=optimizer)
    return model, optimizer, shuffled_loader(env)


def _first_job(env: Any, folder: str, export: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in STRATEGIES:
        torch.manual_seed(100 + env.rank)
        model, optimizer, loader = _setup(name, env, seed=0)
        seen = train_steps(model, optimizer, loader, 2 * N, noise_on="loss")
        out[f"{name}/straight"] = (weights(model), seen)
        torch.manual_seed(100 + env.rank)
        model, optimizer, loader = _setup(name, env, seed=0)
        seen = train_steps(model, optimizer, loader, N, noise_on="loss")
        dl.save_state(pathlib.Path(folder) / name, env, model=model, optimizer=optimizer,
                      loader=loader, step=N)
        out[f"{name}/first-half"] = seen
    if export:
        out["export"] = _export_fsdp_gpt2(env, folder)
    return out


def _second_job(env: Any, folder: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in STRATEGIES:
        torch.manual_seed(999)  # anything: load_state restores each rank's RNG
        model, optimizer, loader = _setup(name, env, seed=42)  # other weights until loaded
        values = dl.load_state(pathlib.Path(folder) / name, env, model=model,
                               optimizer=optimizer, loader=loader)
        seen = train_steps(model, optimizer, loader, N, noise_on="loss")
        out[name] = (weights(model), seen, values)
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


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """The two jobs: train straight and save half-way (and export, with transformers); resume."""
    folder = str(tmp_path_factory.mktemp("resume"))
    first = spawn(_first_job, folder, _importable("transformers"), world_size=2, timeout_s=600)
    second = spawn(_second_job, folder, world_size=2, timeout_s=600)
    return first, second


def test_resume_is_exact_for_every_strategy(jobs: tuple[Any, Any]) -> None:
    first, second = jobs
    for rank in range(2):
        for name in STRATEGIES:
            straight, seen = first[rank][f"{name}/straight"]
            resumed, seen_after, values = second[rank][name]
            assert values == {"step": N}
            assert first[rank][f"{name}/first-half"] + seen_after == seen, (rank, name)
            assert straight.keys() == resumed.keys()
            for key in straight:
                assert torch.equal(straight[key], resumed[key]), (rank, name, key)
    # the two ranks saw different batches (the loader really was sharded)
    assert first[0]["fsdp/straight"][1] != first[1]["fsdp/straight"][1]


@pytest.mark.usefixtures("transformers")
def test_fsdp2_export_loads_with_transformers_and_distlib(jobs: tuple[Any, Any]) -> None:
    from transformers import GPT2LMHeadModel

    first, _ = jobs
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
