"""Over two real gloo ranks, a window counted with accumulate(count=...) gives the gradient of
the token mean over the whole global batch, whatever each rank's and micro-step's padding."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch._dynamo  # its import sets TORCHINDUCTOR_CACHE_DIR; do it before the leak check

import distlib as dl
from distlib.testing import spawn
from tests.batches import padded_token_batches, token_loss
from tests.models import weights

pytestmark = pytest.mark.multiprocess

VOCAB, T, STEPS = 13, 7, 3
# valid tokens of each row, by rank and micro-step: every rank and micro-step differs
VALID = {0: [[7, 1], [0, 2], [5, 5]], 1: [[3, 0], [7, 7], [1, 0]]}


def _lm() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, VOCAB))


def _batches(rank: int) -> list[dict[str, torch.Tensor]]:
    return padded_token_batches(VALID[rank], vocab=VOCAB, tokens=T, seed=100 + rank)


def _step(env: Any, strategy: Any, counted: bool) -> dict[str, Any]:
    """One optimizer step of SGD(lr=1) over one window: the weights move by minus the gradient."""
    model = _lm()
    before = weights(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt = dl.wrap(model, strategy, env=env, optimizer=opt)
    seen = []
    count = (lambda b: (b["labels"] != -100).sum()) if counted else None
    for batch, micro in dl.accumulate(_batches(env.rank), STEPS, count=count, env=env):
        seen.append(micro.num_items)
        loss = token_loss(model, batch, "sum" if counted else "mean")
        dl.backward(torch.nan_to_num(loss), model, micro)
        if micro.sync:
            opt.step()
            opt.zero_grad()
    after = weights(model)
    return {"grads": {k: before[k] - after[k] for k in before}, "num_items": seen}


def _scenarios(env: Any) -> dict[str, Any]:
    return {"ddp": _step(env, dl.DDP(), True),
            "fsdp": _step(env, dl.FSDP(min_num_params=1), True),
            "zero2": _step(env, dl.DeepSpeed(zero_stage=2), True),
            "ddp-uncounted": _step(env, dl.DDP(), False)}


def _reference() -> dict[str, torch.Tensor]:
    """One process, one big batch: every rank's every micro-batch, the token mean."""
    model = _lm()
    every = [b for rank in (0, 1) for b in _batches(rank)]
    whole = {k: torch.cat([b[k] for b in every]) for k in ("ids", "labels")}
    token_loss(model, whole, "mean").backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def ranks() -> Any:
    return spawn(_scenarios, world_size=2, timeout_s=300)


TOTAL = sum(sum(rows) for rows in (*VALID[0], *VALID[1]))


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero2"])
def test_counted_window_over_two_ranks_equals_the_global_token_mean(ranks: Any,
                                                                    name: str) -> None:
    reference = _reference()
    for rank in (0, 1):
        result = ranks[rank][name]
        assert result["num_items"] == [TOTAL] * STEPS  # the whole window, both ranks
        for key, grad in reference.items():
            torch.testing.assert_close(result["grads"][key], grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=key, r=rank: f"{name} rank {r} {k}: {m}")


def test_the_uncounted_mean_of_means_differs(ranks: Any) -> None:
    reference = _reference()
    result = ranks[0]["ddp-uncounted"]
    assert result["num_items"] == [None] * STEPS
    assert not torch.allclose(result["grads"]["4.weight"], reference["4.weight"], atol=1e-3)
