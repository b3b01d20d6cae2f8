"""Four gloo ranks train on an N-D mesh (tensor parallel + FSDP2 / HSDP) like one process.

One launch runs every scenario: a tiny transformers Llama (4 attention heads, 2 kv heads, so
tp is at most 2; a 4-kv-head twin for tp 4) with its own tp plan, and a plain MLP with a
hand-written plan. Each rank returns its loss per step; the mean over the ranks is the loss of
the global batch, compared with one process training the same model on the same batches.
Under (dp_shard 2 x tp 2) the run also saves and reloads its state (DCP over 2-D DTensors).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.testing import spawn
from distlib.topology import Mesh
from tests.models import causal_lm_loss, clipped_losses, tiny_llama

pytestmark = pytest.mark.multiprocess

STEPS, BATCH, SEQ, VOCAB, LR, MAX_NORM = 8, 4, 8, 64, 0.5, 1.0

# name -> (model, mesh sizes, FSDP options): per-layer units and activation checkpointing
# compose with tensor parallelism in torchtitan's order.
SCENARIOS: dict[str, tuple[str, dict[str, int], dict[str, Any]]] = {
    "llama dp_shard2 x tp2": ("llama", {"dp_shard": 2, "tp": 2}, {"wrap_classes": "auto"}),
    "llama dp_replicate2 x tp2": ("llama", {"dp_replicate": 2, "dp_shard": 1, "tp": 2}, {}),
    "llama(4 kv heads) tp4": ("llama-mha", {"dp_shard": 1, "tp": 4},
                              {"wrap_classes": "auto", "activation_checkpointing": True}),
    "mlp dp_shard2 x tp2 (hand plan)": ("mlp", {"dp_shard": 2, "tp": 2}, {}),
}

MLP_PLAN = {"up": "colwise", "down": "rowwise"}


class MLP(torch.nn.Module):
    """A plain model with no plan of its own: embedding, a colwise/rowwise pair, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(self.embed(ids)))))  # type: ignore[no-any-return]


def build(kind: str) -> torch.nn.Module:
    if kind == "mlp":
        torch.manual_seed(0)
        return MLP()
    return tiny_llama(vocab=VOCAB, kv_heads=4 if kind == "llama-mha" else 2)


def batches() -> list[torch.Tensor]:
    """Two global batches, alternated: the model learns them, so the loss falls."""
    g = torch.Generator().manual_seed(3)
    two = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(2)]
    return [two[i % 2] for i in range(STEPS)]


def loss_of(kind: str) -> Any:
    """The loss of a batch of ids for ``kind``: next-token cross-entropy for the MLP."""
    if kind != "mlp":
        return causal_lm_loss

    def mlp_loss(model: Any, ids: torch.Tensor) -> torch.Tensor:
        logits = model(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    return mlp_loss


def one_process(kind: str) -> list[float]:
    """The reference: the whole batch in one process, plain autograd and SGD."""
    model = build(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    return clipped_losses(model, optimizer, batches(), loss_of(kind), max_norm=MAX_NORM)


def _steps(kind: str, env: dl.Env, model: Any, optimizer: Any,
           chunks: list[torch.Tensor]) -> list[float]:
    return clipped_losses(model, optimizer, chunks, loss_of(kind), max_norm=MAX_NORM, env=env)


def _train(env: dl.Env, kind: str, sizes: dict[str, int], options: dict[str, Any],
           folder: str | None) -> dict[str, Any]:
    env = dataclasses.replace(env, mesh=Mesh(**sizes), strategy=dl.FSDP(**options))
    model = build(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    plan = MLP_PLAN if kind == "mlp" else "auto"
    model, optimizer = dl.wrap(model, env, optimizer=optimizer, tp_plan=plan)
    out: dict[str, Any] = {"dtensor": type(model.model.layers[0].self_attn.q_proj.weight).__name__
                           if kind != "mlp" else type(model.up.weight).__name__}
    if kind != "mlp":
        q = model.model.layers[0].self_attn.q_proj.weight
        out["q_placements"] = [type(p).__name__ for p in q.placements]
        out["q_axes"] = q.device_mesh.mesh_dim_names
    data = batches()
    if kind != "mlp":  # the full weights gather every DTensor (tp and FSDP) on the main rank
        full = dl.training.wrapped_of(model).full_state()
        q = full.get("model.layers.0.self_attn.q_proj.weight")
        out["full_q"] = None if q is None else (type(q).__name__, tuple(q.shape))
    if folder is None:
        out["losses"] = _steps(kind, env, model, optimizer, data)
        return out
    first = _steps(kind, env, model, optimizer, data[:4])
    dl.save_state(folder, env, model=model, optimizer=optimizer)
    rest = _steps(kind, env, model, optimizer, data[4:])
    dl.load_state(folder, env, model=model, optimizer=optimizer)
    out["losses"] = first + rest
    out["rest_again"] = _steps(kind, env, model, optimizer, data[4:])
    return out


CP_MESHES = ({"dp_shard": 2, "cp": 2}, {"dp_replicate": 2, "dp_shard": 1, "cp": 2})


def _cp_data_mesh(env: dl.Env, sizes: dict[str, int]) -> tuple[Any, list[Any]]:
    """The mesh FSDP shards over with cp > 1 (buildable on CPU; cp's attention is not)."""
    from distlib.training.fsdp import data_mesh

    mesh = data_mesh(dataclasses.replace(env, mesh=Mesh(**sizes)))
    return mesh.mesh_dim_names, mesh.mesh.tolist()


def _all(env: dl.Env, folder: str) -> dict[str, Any]:
    results: dict[str, Any] = {str(s): _cp_data_mesh(env, s) for s in CP_MESHES}
    for name, (kind, sizes, options) in SCENARIOS.items():
        results[name] = _train(env, kind, sizes, options,
                               folder if name == "llama dp_shard2 x tp2" else None)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    folder = pathlib.Path(tmp_path_factory.mktemp("mesh")) / "state"
    return spawn(_all, str(folder), world_size=4, timeout_s=300).returns  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_mesh_trains_like_one_process(ranks: dict[int, dict[str, Any]], name: str) -> None:
    kind = SCENARIOS[name][0]
    expected = torch.tensor(one_process(kind))
    got = torch.tensor([ranks[r][name]["losses"] for r in range(4)]).mean(dim=0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
    assert (expected[-2:] < expected[:2]).all()  # it learns: equal trajectories are not flat
    assert {ranks[r][name]["dtensor"] for r in range(4)} == {"DTensor"}


def test_tensor_parallel_splits_then_fsdp_shards(ranks: dict[int, dict[str, Any]]) -> None:
    # q_proj is colwise on tp and then sharded by FSDP on the data axes: a 2-D DTensor (dim 0
    # split twice: FSDP's strided shard over the tp shard).
    got = ranks[0]["llama dp_shard2 x tp2"]
    assert got["q_axes"] == ("dp_shard", "tp")
    assert got["q_placements"] == ["_StridedShard", "Shard"]
    # HSDP: replicated across dp_replicate, sharded over dp_shard (size 1), split on tp.
    got = ranks[0]["llama dp_replicate2 x tp2"]
    assert got["q_axes"] == ("dp_replicate", "dp_shard", "tp")
    assert got["q_placements"][0] == "Replicate" and got["q_placements"][-1] == "Shard"
    # Pure TP (dp size 1): the data axis is a one-rank FSDP mesh.
    assert ranks[0]["llama(4 kv heads) tp4"]["q_axes"] == ("dp_shard", "tp")
    for name in ("llama dp_shard2 x tp2", "llama dp_replicate2 x tp2", "llama(4 kv heads) tp4"):
        assert ranks[0][name]["full_q"] == ("Tensor", (32, 32))
        assert ranks[1][name]["full_q"] is None  # the main rank's only


def test_cp_ranks_join_the_fsdp_shard_axis(ranks: dict[int, dict[str, Any]]) -> None:
    # Under cp the ranks of a cp group hold different tokens: FSDP reduces over them too.
    assert ranks[0][str(CP_MESHES[0])] == (("dp_shard_cp",), [0, 1, 2, 3])
    assert ranks[3][str(CP_MESHES[1])] == (("dp_replicate", "dp_shard_cp"), [[0, 1], [2, 3]])


def test_state_saved_under_dp_shard2_x_tp2_reloads(ranks: dict[int, dict[str, Any]]) -> None:
    for rank in range(4):
        got = ranks[rank]["llama dp_shard2 x tp2"]
        torch.testing.assert_close(got["rest_again"], got["losses"][4:], rtol=1e-6, atol=0)

