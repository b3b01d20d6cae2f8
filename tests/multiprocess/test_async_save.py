"""Async saves over 2 gloo ranks: a training loop that saves every 2 steps in the background.

For DDP and FSDP2, one launch trains 8 steps straight, then twice 5 steps saving every 2 steps
with ``keep_last=2`` (once with sync saves, once with ``async_save=True``); the job "dies"
after step 5. A second launch (fresh processes) finds each run's newest checkpoint with
``latest_checkpoint``, resumes and finishes the 8 steps. Both resumed runs must end with
bitwise the straight run's weights (an async save stages the tensors before training changes
them), keep the same two folders, and match one process trained on the same batches.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.checkpoint import SaveHandle, is_checkpoint, latest_checkpoint
from distlib.testing import spawn
from tests.models import net, shuffled_loader, weights

pytestmark = pytest.mark.multiprocess

STRATEGIES = {"ddp": dl.DDP(), "fsdp": dl.FSDP()}
STEPS, DIED_AFTER, EVERY = 8, 5, 2


def _setup(name: str, env: Any) -> tuple[Any, Any, Any]:
    model = net(6, 12, 2, seed=0, hidden="tanh")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model, optimizer = dl.wrap(model, STRATEGIES[name], env=env, optimizer=optimizer)
    return model, optimizer, shuffled_loader(env)


def _run(env: Any, name: str, folder: pathlib.Path | None, mode: str, stop: int) -> Any:
    """The user's loop: train until ``stop``, saving every EVERY steps (None: never)."""
    torch.manual_seed(100 + env.rank)
    model, optimizer, loader = _setup(name, env)
    step, handle = 0, None
    if folder is not None and (latest := latest_checkpoint(folder)) is not None:
        step = dl.load_state(latest, env, model=model, optimizer=optimizer, loader=loader)["step"]
    for x, y in loader:
        noise = torch.randn(1).item() * 1e-3  # the RNG state is part of what resumes
        loss = torch.nn.functional.mse_loss(model(x), y) + noise
        dl.backward(loss, model)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if folder is not None and step % EVERY == 0:
            objects = {"model": model, "optimizer": optimizer, "loader": loader, "step": step}
            path = folder / f"step_{step:04d}"
            if mode == "async":
                handle = dl.save_state(path, env, async_save=True, keep_last=2, **objects)
                assert isinstance(handle, SaveHandle) and handle.path == path
            else:
                assert dl.save_state(path, env, keep_last=2, **objects) == path
        if step == stop:
            break
    if handle is not None:
        assert handle.wait() == handle.path and handle.done()
    return weights(model)


def _first_job(env: Any, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in STRATEGIES:
        out[f"{name}/straight"] = _run(env, name, None, "none", STEPS)
        for mode in ("sync", "async"):
            _run(env, name, pathlib.Path(root) / name / mode, mode, DIED_AFTER)
    return out


def _second_job(env: Any, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in STRATEGIES:
        for mode in ("sync", "async"):
            folder = pathlib.Path(root) / name / mode
            kept = sorted(p.name for p in folder.iterdir())
            latest = latest_checkpoint(folder)
            out[f"{name}/{mode}"] = (_run(env, name, folder, mode, STEPS), kept,
                                     latest.name if latest else None)
    return out


def test_async_saves_resume_like_sync_saves(tmp_path: pathlib.Path) -> None:
    first = spawn(_first_job, str(tmp_path), world_size=2, timeout_s=240)
    second = spawn(_second_job, str(tmp_path), world_size=2, timeout_s=240)
    for rank in range(2):
        for name in STRATEGIES:
            straight = first[rank][f"{name}/straight"]
            for mode in ("sync", "async"):
                resumed, kept, latest = second[rank][f"{name}/{mode}"]
                # keep_last=2 left steps 2 and 4 (of 2, 4), and then 4, 6 and 8's commits
                # ran in the second job; what the first job left is what the second found
                assert kept == ["step_0002", "step_0004"], (rank, name, mode, kept)
                assert latest == "step_0004"
                assert straight.keys() == resumed.keys()
                for key in straight:
                    assert torch.equal(straight[key], resumed[key]), (rank, name, mode, key)
    folder = tmp_path / "fsdp" / "async"
    assert sorted(p.name for p in folder.iterdir()) == ["step_0006", "step_0008"]
    assert is_checkpoint(folder / "step_0008")
    assert not list(folder.glob(".*"))  # no staging or .old left behind
