"""Two gloo ranks train like one process: DDP, FSDP2, DeepSpeed ZeRO-2/3, precisions, accumulation.

One launch runs every scenario (a launch costs seconds, DeepSpeed's import more); each rank
returns its final weights, and the parent compares them with a one-process run of `Single` on
the same global batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch._dynamo  # its import sets TORCHINDUCTOR_CACHE_DIR; do it before the leak check

import distlib as dl
from distlib.testing import spawn
from tests.models import net, train, weights

pytestmark = pytest.mark.multiprocess

ROWS, GLOBAL_BATCH = 32, 8


def _net(seed: int) -> torch.nn.Module:
    return net(8, 16, 16, 2, seed=seed)


def _batches(rank: int, world_size: int, batch: int = GLOBAL_BATCH) -> list[Any]:
    """Global batches of ``batch`` rows; each rank takes its contiguous slice."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(ROWS, 8, generator=g), torch.randn(ROWS, 2, generator=g)
    per = batch // world_size
    return [(x[i + rank * per:i + (rank + 1) * per], y[i + rank * per:i + (rank + 1) * per])
            for i in range(0, ROWS, batch)]


def _run(strategy: Any, env: Any, *, precision: str = "no", steps: int = 1,
         seeds: tuple[int, ...] = (0,), overflow: bool = False,
         batch: int = GLOBAL_BATCH, machines: int = 1) -> dict[str, Any]:
    """Train one model per seed, each wrapped on its own, in one loop."""
    env = dataclasses.replace(env, precision=precision)
    if machines > 1:  # pretend each rank is its own machine (HSDP's replicate axis)
        env = dataclasses.replace(env, num_nodes=machines, node_rank=env.rank, local_rank=0,
                                  local_world_size=env.world_size // machines)
    pairs = []
    for seed in seeds:
        model = _net(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        pairs.append(dl.wrap(model, strategy, env=env, optimizer=opt))
    # overflow: inf gradients in fp16 on rank 0 only, so every rank must skip the step
    train(pairs, _batches(env.rank, env.world_size, batch), steps=steps, clip=1.0,
          overflow=overflow and env.rank == 0)
    return {"weights": [weights(m) for m, _ in pairs],
            "skipped": [getattr(o, "skipped_steps", None) for _, o in pairs]}


# name -> (strategy, options of _run)
SCENARIOS: dict[str, tuple[Any, dict[str, Any]]] = {
    "ddp": (dl.DDP(), {}),
    "ddp-acc2-two-models": (dl.DDP(), {"steps": 2, "seeds": (0, 1)}),
    "ddp-fp16-hook": (dl.DDP(comm_hook="fp16"), {}),
    "ddp-powersgd-static": (dl.DDP(comm_hook="powersgd", static_graph=True,
                                   gradient_as_bucket_view=True), {"steps": 2}),
    "ddp-bf16": (dl.DDP(), {"precision": "bf16", "steps": 2}),
    "ddp-fp16-overflow": (dl.DDP(), {"precision": "fp16", "steps": 2, "overflow": True}),
    "fsdp": (dl.FSDP(wrap_classes=("Block",)), {}),
    "fsdp-acc2-two-models": (dl.FSDP(min_num_params=100, reshard_after_forward=False),
                             {"steps": 2, "seeds": (0, 1)}),
    "fsdp-bf16": (dl.FSDP(wrap_classes=("Block",)), {"precision": "bf16", "steps": 2}),
    "fsdp-fp16-overflow": (dl.FSDP(wrap_classes=("Block",)),
                           {"precision": "fp16", "steps": 2, "overflow": True}),
    "hsdp-two-machines": (dl.FSDP(hybrid_shard=True), {"steps": 2, "machines": 2}),
    "fsdp-cpu-offload": (dl.FSDP(cpu_offload=True), {"steps": 2}),
    "zero2": (dl.DeepSpeed(zero_stage=2), {}),
    "zero2-offload": (dl.DeepSpeed(zero_stage=2, offload_optimizer="cpu"), {"steps": 2}),
    "zero2-acc2-two-models": (dl.DeepSpeed(zero_stage=2), {"steps": 2, "seeds": (0, 1)}),
    "zero3": (dl.DeepSpeed(zero_stage=3), {}),
    "zero3-acc2-two-models": (dl.DeepSpeed(zero_stage=3), {"steps": 2, "seeds": (0, 1)}),
    "zero2-bf16": (dl.DeepSpeed(zero_stage=2), {"precision": "bf16", "steps": 2}),
}


def _count_ddp_syncs(env: Any) -> int:
    """How many backward passes all-reduce under DDP with accumulate(steps=2) over 4 batches."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    calls = []

    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks annotations
        calls.append(bucket.index())
        return default_hooks.allreduce_hook(state, bucket)

    model = dl.wrap(_net(0), dl.DDP(), env=env)
    model.register_comm_hook(None, counting_hook)
    for (x, y), micro in dl.accumulate(_batches(env.rank, env.world_size), steps=2):
        dl.backward(torch.nn.functional.mse_loss(model(x), y), model, micro)
    return sum(1 for index in calls if index == 0)


def _all_scenarios(env: Any) -> dict[str, Any]:
    out = {name: _run(strategy, env, **options) for name, (strategy, options) in
           SCENARIOS.items()}
    out["ddp-syncs"] = _count_ddp_syncs(env)
    return out


@pytest.fixture(scope="module")
def ranks() -> Any:
    return spawn(_all_scenarios, world_size=2, timeout_s=300)


def _reference(options: dict[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in options.items() if k != "machines"}
    return _run(dl.Single(), dl.Env(), **options)


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=tol, atol=tol, msg=key)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_match_one_process(ranks: Any, name: str) -> None:
    options = SCENARIOS[name][1]
    want = _reference(options)
    low = options.get("precision", "no") != "no" or name == "ddp-fp16-hook"
    tol = 2e-2 if low else 1e-5
    for rank in (0, 1):
        got = ranks[rank][name]
        for got_w, want_w in zip(got["weights"], want["weights"], strict=True):
            _close(got_w, want_w, tol)
    if len(want["weights"]) == 2:  # the two models really were trained apart
        assert not torch.equal(want["weights"][0]["2.weight"], want["weights"][1]["2.weight"])


@pytest.mark.parametrize("name", ["ddp-fp16-overflow", "fsdp-fp16-overflow"])
def test_fp16_overflow_on_one_rank_skips_the_step_everywhere(ranks: Any, name: str) -> None:
    assert [ranks[r][name]["skipped"] for r in (0, 1)] == [[1], [1]]
    assert _reference(SCENARIOS[name][1])["skipped"] == [1]


def test_accumulating_two_half_batches_equals_one_full_batch(ranks: Any) -> None:
    full = _reference({"steps": 1, "seeds": (0, 1), "batch": 2 * GLOBAL_BATCH})
    for rank in (0, 1):
        for name in ("ddp-acc2-two-models", "fsdp-acc2-two-models", "zero2-acc2-two-models"):
            for got_w, want_w in zip(ranks[rank][name]["weights"], full["weights"], strict=True):
                _close(got_w, want_w, 1e-5)


def test_ddp_skips_the_all_reduce_between_window_ends(ranks: Any) -> None:
    # 4 batches, windows of 2: batches 1 and 3 sync; batch 0 also does, since the first
    # forward of a loop cannot know it is not a window's end; batch 2 must not.
    assert [ranks[r]["ddp-syncs"] for r in (0, 1)] == [3, 3]
