"""Async saves under faults, 2 gloo ranks: a failed write, loads during a pending save, a kill.

DCP's file writer is wrapped inside the ranks to inject the faults where they matter: in the
background write, after `save_state` has returned.

- rank 1's write raises: ``wait()`` raises on both ranks, the partial folder is removed and the
  previous checkpoint still loads;
- the write is slowed: a `load_state` of the same path into another model reads the previous
  complete checkpoint while the save is pending; a `load_state` (or a second save) given the
  saved model waits for the commit first and sees the new one;
- rank 1 is SIGKILLed in the middle of its write: the job fails, the series' last complete
  checkpoint survives, `latest_checkpoint` finds it and a new process loads it.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.checkpoint import is_checkpoint, latest_checkpoint
from distlib.errors import CheckpointError, LaunchError
from distlib.testing import spawn
from tests.models import weights

pytestmark = pytest.mark.multiprocess


@contextlib.contextmanager
def _writes(before: Callable[[], None]) -> Iterator[None]:
    """Run ``before`` at the start of every DCP file write of this process."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    original = FileSystemWriter.write_data

    def write_data(self: Any, plan: Any, planner: Any) -> Any:
        before()
        return original(self, plan, planner)

    FileSystemWriter.write_data = write_data  # type: ignore[method-assign]
    try:
        yield
    finally:
        FileSystemWriter.write_data = original  # type: ignore[method-assign]


def _fail() -> None:
    raise OSError("injected write failure")


def _model(env: Any, seed: int) -> Any:
    torch.manual_seed(seed)
    return dl.wrap(torch.nn.Linear(4, 3), dl.DDP(), env=env)


def _bump(model: Any) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)


def _failing_and_pending(env: Any, root: str) -> dict[str, Any]:
    path = pathlib.Path(root) / "ckpt"
    model = _model(env, seed=0)
    dl.save_state(path, env, model=model, step=1)
    first = weights(model)
    out: dict[str, Any] = {}
    _bump(model)
    with _writes(_fail if env.rank == 1 else lambda: None):
        handle = dl.save_state(path, env, async_save=True, model=model, step=2)
        try:
            handle.wait()
        except CheckpointError as exc:
            out["failed"] = str(exc)
    out["partial_left"] = (path.parent / ".ckpt.partial").exists()
    fresh = _model(env, seed=9)
    out["after_failure"] = dl.load_state(path, env, model=fresh)["step"]
    out["after_failure_equal"] = all(torch.equal(v, first[k]) for k, v in weights(fresh).items())

    model = _model(env, seed=0)  # what step 1 saved, then changed
    _bump(model)
    changed = weights(model)
    with _writes(lambda: time.sleep(3.0)):
        handle = dl.save_state(path, env, async_save=True, model=model, step=3)
        _bump(model)  # training goes on at once: the save holds a staged copy
        other = _model(env, seed=9)
        out["during"] = dl.load_state(path, env, model=other)["step"]
        out["pending_after_load"] = not handle.done()
        out["during_equal_old"] = all(torch.equal(v, first[k]) for k, v in weights(other).items())
        second = dl.save_state(path, env, async_save=True, model=model, step=4)
        out["first_done_when_second_returned"] = handle.done()
        out["second"] = str(second.wait())
    reread = _model(env, seed=9)
    out["final"] = dl.load_state(path, env, model=reread)["step"]
    bumped = {k: v + 1.0 for k, v in changed.items()}
    out["final_equal"] = all(torch.equal(v, bumped[k]) for k, v in weights(reread).items())
    out["first_wait"] = str(handle.wait())
    return out


def _killed(env: Any, root: str) -> None:
    series = pathlib.Path(root)
    model = _model(env, seed=0)
    dl.save_state(series / "step_1", env, model=model, step=1, keep_last=1)
    _bump(model)

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with _writes(die if env.rank == 1 else lambda: None):
        handle = dl.save_state(series / "step_2", env, async_save=True, keep_last=1,
                               model=model, step=2)
        handle.wait()


def test_failed_write_and_loads_during_a_pending_save(tmp_path: pathlib.Path) -> None:
    result = spawn(_failing_and_pending, str(tmp_path), world_size=2, timeout_s=180)
    for rank in range(2):
        out = result[rank]
        assert "every rank must write its part" in out["failed"] or "injected" in out["failed"]
        assert out["partial_left"] is False
        assert out["after_failure"] == 1 and out["after_failure_equal"]
        assert out["during"] == 1 and out["during_equal_old"], out
        assert out["pending_after_load"], "the load did not overlap the pending save"
        assert out["first_done_when_second_returned"]
        assert out["final"] == 4 and out["final_equal"]
        assert out["second"] == out["first_wait"] == str(tmp_path / "ckpt")
    assert "injected write failure" in result[1]["failed"]


def test_a_rank_killed_during_an_async_save_leaves_the_last_checkpoint(
        tmp_path: pathlib.Path) -> None:
    with pytest.raises(LaunchError):
        spawn(_killed, str(tmp_path), world_size=2, timeout_s=120)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_1"
    assert is_checkpoint(tmp_path / "step_1") and not is_checkpoint(tmp_path / "step_2")
    model = torch.nn.Linear(4, 3)
    values = dl.load_state(tmp_path / "step_1", dl.Env(), model=model, rng=False)
    torch.manual_seed(0)
    assert values == {"step": 1}
    assert torch.equal(model.weight, torch.nn.Linear(4, 3).weight)
