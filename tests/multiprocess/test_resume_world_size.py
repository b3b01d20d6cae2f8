"""Save at 2 ranks mid-epoch, resume the epoch at 1 and at 3 ranks (issue 17, part 3).

A user-shaped script: DDP and FSDP2 (Single in one process) train 5 steps of a shuffled epoch at 2 gloo ranks and
`dl.save_state`; new jobs at 1 and 3 ranks `dl.load_state` the weights (resharded by DCP),
the optimizer, the loader and the RNG, and train the rest of the epoch, gathering the sample
ids of each step with `dl.gather_metrics`. The ids seen before and after the interruption are
the epoch's, each exactly once (at 3 ranks the position, 20 samples, is inside a step of 6: the
rest is re-dealt and its padding dropped by gather_metrics).
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.testing import spawn
from tests.models import net, weights

pytestmark = pytest.mark.multiprocess

SAMPLES, BATCH, STEPS = 30, 2, 5  # 5 steps of 2 x 2 samples: 20 read before the save
STRATEGIES = {"ddp": dl.DDP(), "fsdp": dl.FSDP()}


def _setup(name: str, env: Any) -> tuple[Any, Any, Any]:
    model = net(6, 12, 3, seed=0, hidden="tanh")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # FSDP2 needs a group: in one process the FSDP checkpoint loads into a plain model.
    strategy = STRATEGIES[name] if env.world_size > 1 else dl.Single()
    model, optimizer = dl.wrap(model, strategy, env=env, optimizer=optimizer)
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.arange(SAMPLES),
                                          torch.randn(SAMPLES, 6, generator=g),
                                          torch.randn(SAMPLES, 3, generator=g))
    raw = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True)  # no generator
    return model, optimizer, dl.shard(raw, env)


def _step(model: Any, optimizer: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = torch.nn.functional.mse_loss(model(x), y) + torch.randn(()) * 1e-3
    dl.backward(loss, model)
    optimizer.step()
    optimizer.zero_grad()


def _first_job(env: Any, folder: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in STRATEGIES:
        dl.seed(7, env)
        model, optimizer, loader = _setup(name, env)
        seen: list[int] = []
        for step, (ids, x, y) in enumerate(loader, 1):
            _step(model, optimizer, x, y)
            seen += dl.gather_metrics(ids, env, loader).tolist()
            if step == STEPS:
                dl.save_state(pathlib.Path(folder) / name, env, model=model,
                              optimizer=optimizer, loader=loader, step=step)
                break
        out[name] = (seen, weights(model))
    return out


def _resumed_job(env: Any, folder: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in STRATEGIES:
        torch.manual_seed(999)  # anything: load_state sets the RNG
        model, optimizer, loader = _setup(name, env)
        values = dl.load_state(pathlib.Path(folder) / name, env, model=model,
                               optimizer=optimizer, loader=loader)
        loaded, draw = weights(model), torch.rand(()).item()
        remaining, seen = loader.remaining, []
        start_epoch = loader.state_dict()["epoch"]  # where the saved job was: epoch 0
        for _ in range(start_epoch, 1):
            for ids, x, y in loader:
                _step(model, optimizer, x, y)
                seen += dl.gather_metrics(ids, env, loader).tolist()
        out[name] = (values, loaded, seen, remaining, draw, start_epoch)
    return out


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    folder = str(tmp_path_factory.mktemp("reshard"))
    out = {2: spawn(_first_job, folder, world_size=2, timeout_s=300)}
    for world in (1, 3):
        out[world] = spawn(_resumed_job, folder, world_size=world, timeout_s=300)
    return out


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_the_epoch_resumed_at_another_size_reads_every_sample_once(
        jobs: dict[int, Any], world: int, name: str) -> None:
    before, saved = jobs[2][0][name]
    assert len(before) == STEPS * 2 * BATCH and jobs[2][1][name][0] == before
    for rank in range(world):
        values, loaded, after, remaining, _, start_epoch = jobs[world][rank][name]
        assert values == {"step": STEPS} and start_epoch == 0
        assert sorted(before + after) == list(range(SAMPLES)), (rank, after)
        assert remaining == -(-(SAMPLES - len(before)) // (world * BATCH))  # steps left
        for key in saved:  # the weights, resharded by DCP to the new number of ranks
            assert torch.equal(saved[key], loaded[key]), (rank, key)


def test_ranks_resumed_at_another_size_draw_derived_random_numbers(
        jobs: dict[int, Any]) -> None:
    draws = {rank: jobs[3][rank]["ddp"][4] for rank in range(3)}
    assert len(set(draws.values())) == 3  # one stream per rank
    assert jobs[1][0]["ddp"][4] == draws[0]  # rank 0's seed depends on the checkpoint alone
