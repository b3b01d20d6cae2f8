"""A checkpoint saved under one mesh resumes under another, in one process, and as safetensors.

One 4-rank launch: the tiny Llama of tests/models.py (4 attention heads, 2 kv heads) trains 2
steps under (dp_shard 2 x tp 2) with FSDP2 and AdamW and saves its state; the same model then
takes 2 more steps, the reference. In the same ranks a fresh model is wrapped under each other
mesh, (dp_shard 4), (dp_replicate 2 x tp 2) and the saving mesh again, and loads the
checkpoint: its full weights must equal the saved ones, and its 2 more steps must give the
reference's losses and weights (relative 1e-5). AdamW's state (moments and step count) matters
there: a fresh optimizer's first step is a sign step, far from the resumed one. The 4-kv-head
twin does the same from (dp_shard 2 x tp 2) to (tp 4). Then the parent process loads the
2-kv-head checkpoint into a plain model and optimizer, and `merge_weights` turns it into plain
safetensors.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import distlib as dl
from distlib.checkpoint.export import merge_weights
from distlib.cli import main
from distlib.testing import spawn
from distlib.topology import Mesh
from tests.models import causal_lm_loss, clipped_losses, tiny_llama, weights

pytestmark = pytest.mark.multiprocess

BATCH, SEQ, VOCAB, LR, MAX_NORM = 4, 8, 64, 0.01, 1.0
SAVED_UNDER = {"dp_shard": 2, "tp": 2}
# name -> (kv heads, the mesh a fresh model is wrapped under before it loads the checkpoint).
# 2 kv heads allow tp 2 at most; the 4-kv-head twin (its own checkpoint) goes to tp 4.
TARGETS: dict[str, tuple[int, dict[str, int]]] = {
    "dp_shard4": (2, {"dp_shard": 4}),
    "dp_replicate2 x tp2": (2, {"dp_replicate": 2, "dp_shard": 1, "tp": 2}),
    "dp_shard2 x tp2 again": (2, SAVED_UNDER),
    "tp4 (4 kv heads)": (4, {"dp_shard": 1, "tp": 4}),
}
AXES = {"dp_shard4": ("dp_shard",), "dp_replicate2 x tp2": ("dp_replicate", "dp_shard", "tp"),
        "dp_shard2 x tp2 again": ("dp_shard", "tp"), "tp4 (4 kv heads)": ("dp_shard", "tp")}


def batches() -> list[torch.Tensor]:
    """Four global batches: two to train before the save, two after it."""
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(4)]


def _steps(env: dl.Env, model: Any, optimizer: Any, chunks: list[torch.Tensor]) -> list[float]:
    """This rank's steps on its rows of each global batch: AdamW after clipping."""
    return clipped_losses(model, optimizer, chunks, causal_lm_loss, max_norm=MAX_NORM, env=env)


def _wrapped(env: dl.Env, sizes: dict[str, Any], kv_heads: int) -> tuple[dl.Env, Any, Any]:
    """A fresh model and AdamW wrapped by FSDP under the mesh ``sizes``."""
    env = dataclasses.replace(env, mesh=Mesh(**sizes), strategy=dl.FSDP())
    model = tiny_llama(vocab=VOCAB, kv_heads=kv_heads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model, optimizer = dl.wrap(model, env, optimizer=optimizer)
    return env, model, optimizer


def _main_only(env: dl.Env, value: Any) -> Any:
    return value if env.is_main else None


def _save_and_go_on(env: dl.Env, folder: str, kv_heads: int) -> dict[str, Any]:
    """Train 2 steps under SAVED_UNDER, save, then the reference: 2 more steps."""
    data = batches()
    source, model, optimizer = _wrapped(env, SAVED_UNDER, kv_heads)
    _steps(source, model, optimizer, data[:2])
    dl.save_state(folder, source, model=model, optimizer=optimizer)
    out: dict[str, Any] = {"saved": _main_only(env, weights(model))}
    out["reference"] = _steps(source, model, optimizer, data[2:])
    out["reference weights"] = _main_only(env, weights(model))
    return out


def _reshard(env: dl.Env, folder: str) -> dict[int | str, Any]:
    """Per kv-head count the saved run; per target mesh the resumed one."""
    data = batches()
    out: dict[int | str, Any] = {kv: _save_and_go_on(env, f"{folder}{kv}", kv) for kv in (2, 4)}
    for name, (kv_heads, sizes) in TARGETS.items():
        target, model, optimizer = _wrapped(env, sizes, kv_heads)
        dl.load_state(f"{folder}{kv_heads}", target, model=model, optimizer=optimizer)
        q = model.model.layers[0].self_attn.q_proj.weight
        out[name] = {"axes": q.device_mesh.mesh_dim_names,
                     "loaded": _main_only(env, weights(model)),
                     "losses": _steps(target, model, optimizer, data[2:]),
                     "steps": _main_only(env, int(optimizer.state[q]["step"]))}
        out[name]["weights"] = _main_only(env, weights(model))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Where the ranks save: ``state2`` (2 kv heads) and ``state4`` (4 kv heads)."""
    return pathlib.Path(tmp_path_factory.mktemp("reshard"))


@pytest.fixture(scope="module")
def ranks(folder: pathlib.Path) -> dict[int, Any]:
    return dict(spawn(_reshard, str(folder / "state"), world_size=4, timeout_s=240).returns)


def _mean_losses(ranks: dict[int, Any], pick: Any) -> torch.Tensor:
    # Each rank's loss is its data-parallel shard's mean; the mean over all four ranks is the
    # global batch's loss under every mesh (tp ranks repeat their group's loss).
    return torch.tensor([pick(ranks[r]) for r in range(4)]).mean(dim=0)


@pytest.mark.parametrize("name", list(TARGETS))
def test_a_checkpoint_reshards_onto_another_mesh(ranks: dict[int, Any], name: str) -> None:
    kv_heads = TARGETS[name][0]
    main, saved = ranks[0][name], ranks[0][kv_heads]
    assert main["axes"] == AXES[name]
    torch.testing.assert_close(main["loaded"], saved["saved"], rtol=0, atol=0)
    torch.testing.assert_close(_mean_losses(ranks, lambda r: r[name]["losses"]),
                               _mean_losses(ranks, lambda r: r[kv_heads]["reference"]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(main["weights"], saved["reference weights"], rtol=1e-5, atol=1e-7)
    assert main["steps"] == 4  # AdamW's step count came back (2 saved, 2 more)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_the_steps_after_the_save_move_the_weights_past_the_tolerance(
        ranks: dict[int, Any], kv_heads: int) -> None:
    # AdamW moves a weight by up to about lr a step, whatever the gradient's size: an optimizer
    # state that did not come back (fresh moments) would move them differently, by far more
    # than the 1e-5 the weights-after checks allow; and the saved weights are not the initial ones.
    got = ranks[0][kv_heads]
    moved = max((got["reference weights"][k] - got["saved"][k]).abs().max().item()
                for k in got["saved"])
    assert moved > 1e-3
    initial = tiny_llama(vocab=VOCAB, kv_heads=kv_heads).state_dict()
    assert max((got["saved"][k] - initial[k]).abs().max().item() for k in got["saved"]) > 1e-3


def test_one_process_loads_the_mesh_checkpoint(ranks: dict[int, Any],
                                               folder: pathlib.Path) -> None:
    checkpoint = folder / "state2"
    got = ranks[0][2]
    model = tiny_llama(vocab=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    # Four ranks' RNG states do not go into one process: the default derives this one's.
    torch.manual_seed(123)
    dl.load_state(checkpoint, dl.Env(), model=model)
    derived = torch.get_rng_state()
    dl.load_state(checkpoint, dl.Env(), model=model)
    assert torch.equal(torch.get_rng_state(), derived)  # the same on every resume
    dl.load_state(checkpoint, dl.Env(), rng=False, model=model, optimizer=optimizer)
    torch.testing.assert_close(weights(model), got["saved"], rtol=0, atol=0)
    losses = torch.tensor(clipped_losses(model, optimizer, batches()[2:], causal_lm_loss,
                                         max_norm=MAX_NORM))
    torch.testing.assert_close(losses, _mean_losses(ranks, lambda r: r[2]["reference"]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(weights(model), got["reference weights"], rtol=1e-5, atol=1e-7)


def test_merge_weights_gives_the_full_weights(ranks: dict[int, Any], folder: pathlib.Path,
                                              tmp_path: pathlib.Path) -> None:
    saved = ranks[0][2]["saved"]
    out = merge_weights(folder / "state2", tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    merged = load_file(out / "model.safetensors")
    assert sorted(merged) == sorted(saved)
    assert all(type(t) is torch.Tensor for t in merged.values())  # plain tensors, no DTensor
    torch.testing.assert_close(merged, saved, rtol=0, atol=0)
    model = tiny_llama(vocab=VOCAB)  # and a plain model loads them as it loads its own
    model.load_state_dict(merged)
    torch.testing.assert_close(weights(model), saved, rtol=0, atol=0)


def test_the_merge_weights_command_exports_the_tp_checkpoint(
        ranks: dict[int, Any], folder: pathlib.Path, tmp_path: pathlib.Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # `distlib merge-weights` is the same function behind the command line: the 4-kv-head
    # model's DTensor shards (tp 2 of 4 kv heads) come out whole.
    saved = ranks[0][4]["saved"]
    assert main(["merge-weights", str(folder / "state4"), str(tmp_path / "cli")]) == 0
    assert str(tmp_path / "cli") in capsys.readouterr().out
    merged = load_file(tmp_path / "cli" / "model.safetensors")
    torch.testing.assert_close(merged, saved, rtol=0, atol=0)
    assert merged["model.layers.0.self_attn.k_proj.weight"].shape == (32, 32)

