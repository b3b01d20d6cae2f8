"""Two gloo ranks build a model on the meta device, wrap it, and load only their own shards.

One launch of 2 ranks runs every scenario (and one of 4 ranks FSDP2 over tensor parallelism),
as a user would write it: ``init_empty_weights`` -> ``dl.wrap``
(FSDP2, tensor parallel, HSDP) -> ``dl.load_checkpoint`` of a transformers checkpoint saved
with ``save_pretrained`` (one safetensors file, shards with an index) or a ``.bin``. Each rank
returns the full weights (gathered from its shards), the loss before and after one SGD step,
and its peak RSS growth while loading a ~320 MB checkpoint; the parent compares them with a
plain single-process load of the same files, bitwise for the weights.

The memory bound: each rank's peak RSS growth during the load stays below its share of the
model (the bytes of its local shards) + the largest tensor + ``MARGIN`` = 16 MiB. Measured
(2 ranks, 2 cores, 322 MB fp32 checkpoint, largest tensor 32.8 MB, share 161.2 MB): growth =
share + 3.2-3.4 MiB, because the pages of the memory map are dropped after each tensor (so
even the largest tensor is not paid in full). A full load per rank (what each rank pays
without the sharded path) does not fit under the bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.errors import CheckpointError
from distlib.testing import spawn
from distlib.topology import Mesh

pytestmark = pytest.mark.multiprocess

MIB = 2**20
MARGIN = 16 * MIB
LR = 0.1

# name -> (checkpoint folder, tied embeddings, vocab, mesh sizes, FSDP options, dtype)
SCENARIOS: dict[str, tuple[str, bool, int, dict[str, int], dict[str, Any], str | None]] = {
    # FSDP2 over both ranks: 67 rows split 34/33 (FSDP2's padded last shard), tied lm_head
    "fsdp, tied, one file": ("tied", True, 67, {"dp_shard": 2}, {"wrap_classes": "auto"}, None),
    "fsdp, untied, index": ("index", False, 66, {"dp_shard": 2}, {}, None),
    # tensor parallel: Shard(0) (colwise), Shard(1) (rowwise) under a one-rank FSDP axis
    "tp2, untied, index": ("index", False, 66, {"dp_shard": 1, "tp": 2}, {}, None),
    # HSDP with one rank per shard group: Replicate() over dp_replicate
    "hsdp, tied, .bin": ("bin", True, 67, {"dp_replicate": 2, "dp_shard": 1}, {}, None),
    "fsdp, .bin": ("bin", True, 67, {"dp_shard": 2}, {}, None),
    "fsdp, bf16": ("tied", True, 67, {"dp_shard": 2}, {}, "bfloat16"),
}
# 4 ranks, its own launch: FSDP2 over tensor parallelism, (_StridedShard, Shard) placements;
# the embedding's 66 rows split 33/33 by tp, then 17/16 by FSDP2
FOUR_RANKS = {"fsdp2 x tp2, untied, index": ("index", False, 66, {"dp_shard": 2, "tp": 2},
                                              {"wrap_classes": "auto"}, None)}
ALL = {**SCENARIOS, **FOUR_RANKS}

BIG_VOCAB = 8000
BIG = {"hidden_size": 1024, "intermediate_size": 2816,
       "num_hidden_layers": 5, "num_attention_heads": 8, "num_key_value_heads": 8}


def config(tied: bool, vocab: int, **sizes: int) -> Any:
    from transformers import LlamaConfig

    widths = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, **sizes}
    return LlamaConfig(vocab_size=vocab, tie_word_embeddings=tied, **widths)


def empty_model(tied: bool, vocab: int, **sizes: int) -> Any:
    from transformers import LlamaForCausalLM

    with dl.init_empty_weights():
        return LlamaForCausalLM(config(tied, vocab, **sizes))


def batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(1))


def step_losses(model: Any, vocab: int, optimizer: Any) -> tuple[float, float]:
    """The loss, one SGD step on it, the loss again (every rank the same batch)."""
    ids = batch(vocab)
    first = model(input_ids=ids, labels=ids).loss
    dl.backward(first, model)
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        second = model(input_ids=ids, labels=ids).loss
    return first.item(), second.item()


def _full(model: Any) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def _scenario(env: dl.Env, folder: str, name: str) -> dict[str, Any]:
    files, tied, vocab, sizes, options, dtype = ALL[name]
    env = dataclasses.replace(env, mesh=Mesh(**sizes), strategy=dl.FSDP(**options))
    model = empty_model(tied, vocab)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = dl.wrap(model, env, optimizer=optimizer)
    dl.load_checkpoint(model, os.path.join(folder, files),
                       dtype=None if dtype is None else getattr(torch, dtype))
    q = model.model.layers[0].self_attn.q_proj.weight
    out: dict[str, Any] = {
        "placements": [type(p).__name__ for p in q.placements],
        "local_rows": q.to_local().shape[0], "embed_rows": model.model.embed_tokens.weight
        .to_local().shape[0], "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "inv_freq": model.model.rotary_emb.inv_freq.clone(), "full": _full(model)}
    if dtype is None:  # the optimizer built before the load steps the loaded parameters
        out["losses"] = step_losses(model, vocab, optimizer)
    return out


def _status(field: str) -> int:
    text = pathlib.Path("/proc/self/status").read_text()
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert found is not None, field
    return int(found.group(1)) * 1024


def _memory(env: dl.Env, folder: str) -> dict[str, int]:
    """Peak RSS growth of this rank while loading the big checkpoint into FSDP2 shards."""
    env = dataclasses.replace(env, mesh=Mesh(dp_shard=2), strategy=dl.FSDP())
    model = dl.wrap(empty_model(False, BIG_VOCAB, **BIG), env)
    # reset the peak RSS (VmHWM) to the current RSS: Linux's clear_refs "5"
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    dl.load_checkpoint(model, os.path.join(folder, "big"))
    peak = _status("VmHWM")
    share = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    return {"growth": peak - before, "share": share}


def _refusal(env: dl.Env, folder: str) -> str:
    """The error every rank gets for a .bin only rank 0 opens (and refuses): no rank hangs."""
    env = dataclasses.replace(env, mesh=Mesh(dp_shard=2), strategy=dl.FSDP())
    model = dl.wrap(empty_model(True, 67), env)
    try:
        dl.load_checkpoint(model, os.path.join(folder, "unsafe"))
    except CheckpointError as exc:
        return str(exc)
    return "loaded"


def _all(env: dl.Env, folder: str) -> dict[str, Any]:
    results: dict[str, Any] = {"memory": _memory(env, folder)}  # first: a clean peak
    for name in SCENARIOS:
        results[name] = _scenario(env, folder, name)
    results["unsafe"] = _refusal(env, folder)
    return results


def _save(folder: pathlib.Path) -> dict[str, int]:
    """The checkpoints, as transformers writes them; the big one's sizes."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    for files, tied, vocab, shard in (("tied", True, 67, "10GB"), ("index", False, 66, "20KB")):
        torch.manual_seed(0)
        LlamaForCausalLM(config(tied, vocab)).save_pretrained(folder / files, max_shard_size=shard)
    torch.manual_seed(0)
    state = LlamaForCausalLM(config(True, 67)).state_dict()
    (folder / "bin").mkdir()
    state.pop("lm_head.weight")  # stored once, as transformers does for tied weights
    torch.save(state, folder / "bin" / "pytorch_model.bin")
    (folder / "unsafe").mkdir()  # an object weights_only refuses
    torch.save({**state, "extra": argparse.Namespace(run="code")},
               folder / "unsafe" / "pytorch_model.bin")
    shapes = {n: tuple(p.shape) for n, p in empty_model(False, BIG_VOCAB, **BIG)
              .state_dict().items()}
    g = torch.Generator().manual_seed(0)
    big = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
    (folder / "big").mkdir()
    save_file(big, folder / "big" / "model.safetensors")
    sizes = [t.numel() * t.element_size() for t in big.values()]
    return {"total": sum(sizes), "largest": max(sizes)}


def _four(env: dl.Env, folder: str) -> dict[str, Any]:
    return {name: _scenario(env, folder, name) for name in FOUR_RANKS}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, transformers: Any) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("sharded")
    sizes = _save(folder)
    ranks = spawn(_all, str(folder), world_size=2, timeout_s=240).returns
    four = spawn(_four, str(folder), world_size=4, timeout_s=240).returns
    return {"folder": folder, "sizes": sizes, "ranks": ranks, "four": four}


def one_process(folder: pathlib.Path, name: str) -> tuple[Any, Any]:
    """The reference: a plain load of the same files into one process's model."""
    files, tied, vocab, _, _, dtype = ALL[name]
    model = dl.load_checkpoint(empty_model(tied, vocab), folder / files,
                               dtype=None if dtype is None else getattr(torch, dtype))
    return model, torch.optim.SGD(model.parameters(), lr=LR)


@pytest.mark.parametrize("name", [*SCENARIOS, *FOUR_RANKS])
def test_sharded_load_equals_a_full_load(run: dict[str, Any], name: str) -> None:
    model, optimizer = one_process(run["folder"], name)
    expected = {n: p.detach() for n, p in model.named_parameters()}
    ranks = run["four"] if name in FOUR_RANKS else run["ranks"]
    for rank in ranks:
        got = ranks[rank][name]
        assert got["full"].keys() == expected.keys()
        for key, value in expected.items():
            assert got["full"][key].dtype == value.dtype, key
            assert torch.equal(got["full"][key], value), (rank, key)
        # the non-persistent rotary buffer, real under init_empty_weights, stayed as built
        assert torch.equal(got["inv_freq"], model.model.rotary_emb.inv_freq)
        assert got["tied"] == ALL[name][1]
    if ALL[name][5] is None:
        vocab = ALL[name][2]
        ids = batch(vocab)
        first = model(input_ids=ids, labels=ids).loss
        first.backward()
        optimizer.step()
        with torch.no_grad():
            second = model(input_ids=ids, labels=ids).loss
        want = torch.tensor([first.item(), second.item()])
        for rank in ranks:
            got = torch.tensor(ranks[rank][name]["losses"])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        assert want[1] < want[0]  # the step moved the weights: the check is not vacuous


def test_each_rank_holds_its_own_shard(run: dict[str, Any]) -> None:
    ranks = run["ranks"]
    fsdp = "fsdp, tied, one file"
    assert ranks[0][fsdp]["placements"] == ["Shard"]
    assert [ranks[r][fsdp]["embed_rows"] for r in (0, 1)] == [34, 33]  # uneven: 67 rows
    tp = "tp2, untied, index"
    assert ranks[0][tp]["placements"] == ["_StridedShard", "Shard"]
    assert [ranks[r][tp]["local_rows"] for r in (0, 1)] == [16, 16]  # q_proj 32 rows split
    assert ranks[0]["hsdp, tied, .bin"]["placements"] == ["Replicate", "Shard"]
    four = run["four"]
    name = "fsdp2 x tp2, untied, index"
    assert four[0][name]["placements"] == ["_StridedShard", "Shard"]
    assert [four[r][name]["embed_rows"] for r in range(4)] == [17, 17, 16, 16]


def test_a_file_rank_0_refuses_is_refused_on_every_rank(run: dict[str, Any]) -> None:
    messages = [run["ranks"][rank]["unsafe"] for rank in (0, 1)]
    assert messages[0] == messages[1]
    assert "must hold only tensors (it is opened with weights_only=True)" in messages[0]
    assert "argparse.Namespace" in messages[0]


def test_peak_memory_is_the_share_plus_one_tensor(run: dict[str, Any]) -> None:
    sizes = run["sizes"]
    bound_margin = sizes["largest"] + MARGIN
    for rank in (0, 1):
        memory = run["ranks"][rank]["memory"]
        assert memory["share"] < 0.55 * sizes["total"]  # half the model, each
        assert memory["growth"] < memory["share"] + bound_margin, (rank, memory, sizes)
        assert memory["growth"] > 0.9 * memory["share"]  # the shards are really resident
    # the bound is tight enough to catch a rank that loads everything
    assert max(run["ranks"][r]["memory"]["share"] for r in (0, 1)) + bound_margin < sizes["total"]

