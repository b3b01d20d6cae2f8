"""find_executable_batch_size over real gloo ranks: one rank running out of memory makes every
rank retry at the same size; one rank's real error makes every rank raise, without a hang."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import pytest

from distlib.testing import spawn

pytestmark = pytest.mark.multiprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _scenarios(env: Any) -> dict[str, Any]:
    import torch

    import distlib as dl

    out: dict[str, Any] = {}

    def one_rank_runs_out(rank: int, threshold: int, tried: list[int]) -> Any:
        def train(batch_size: int, scale: int) -> int:
            tried.append(batch_size)
            # a collective inside fn, before the out-of-memory: every rank reaches it
            total = dl.reduce(torch.tensor([batch_size]), env, op="sum")
            if env.rank == rank and batch_size > threshold:
                raise torch.OutOfMemoryError(f"CUDA out of memory at {batch_size}")
            return int(total.item()) * scale

        return train

    tried: list[int] = []
    out["halving"] = dl.find_executable_batch_size(one_rank_runs_out(1, 20, tried), env, 128)(1)
    out["halving_tried"] = tried

    tried = []
    run = dl.find_executable_batch_size(one_rank_runs_out(0, 50, tried), env, 100, factor=0.9)
    out["factor"] = run(10)
    out["factor_again"] = run(10)  # starts from the size that worked
    out["factor_tried"] = tried

    tried = []
    try:
        dl.find_executable_batch_size(one_rank_runs_out(1, 0, tried), env, 8)(1)
    except RuntimeError as exc:
        out["exhausted"] = (type(exc).__name__, str(exc), tried)

    tried = []

    def rank_1_fails_at_32(batch_size: int) -> int:
        tried.append(batch_size)
        if env.rank == 0 and batch_size > 32:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        if env.rank == 1 and batch_size == 32:
            raise ValueError(f"bad labels at batch size {batch_size}")
        return batch_size

    try:
        dl.find_executable_batch_size(rank_1_fails_at_32, env, 128)()
    except Exception as exc:  # what each rank raised is the result
        out["failed"] = (type(exc).__name__, str(exc), tried)

    # a rank whose attempt succeeded still retries when the other ran out: no one is left over
    ran: list[int] = []

    def rank_0_succeeds_first(batch_size: int) -> int:
        ran.append(batch_size)
        if env.rank == 1 and batch_size == 4:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 TB")
        return batch_size

    out["mixed"] = (dl.find_executable_batch_size(rank_0_succeeds_first, env, 4)(), ran)
    out["after"] = dl.any_rank(env.rank == 1, env)  # the default group still lines up
    return out


def test_every_rank_ends_with_the_same_size_and_the_same_sizes_tried() -> None:
    result = spawn(_scenarios, world_size=2, timeout_s=180)
    main, other = result[0], result[1]

    assert main["halving_tried"] == other["halving_tried"] == [128, 64, 32, 16]
    assert main["halving"] == other["halving"] == 32  # the sum over the ranks of 16

    sequence = [100, 90, 81, 72, 64, 57, 51, 45]
    assert main["factor_tried"] == other["factor_tried"] == [*sequence, 45]
    assert main["factor"] == main["factor_again"] == other["factor"] == 900

    for rank in (0, 1):
        name, msg, tried = result[rank]["exhausted"]
        assert (name, tried) == ("RuntimeError", [8, 4, 2, 1])
        assert "8, 4, 2, 1 (factor 0.5)" in msg

    # rank 1's own error reaches its caller unchanged; rank 0 is told which rank and why
    assert other["failed"] == ("ValueError", "bad labels at batch size 32", [128, 64, 32])
    name, msg, tried = main["failed"]
    assert (name, tried) == ("CollectiveError", [128, 64, 32])
    assert msg == ("find_executable_batch_size(): every rank's attempt must succeed or run out "
                   "of memory, but at batch_size=32 got rank 1: ValueError: bad labels at batch "
                   "size 32. This rank stops too, so that no rank waits for another; the cause "
                   "is in that rank's traceback.")

    assert main["mixed"] == other["mixed"] == (2, [4, 2])
    assert main["after"] is other["after"] is True


SCRIPT = '''
import sys
import torch
import distlib as dl

env = dl.detect()
model = dl.wrap(torch.nn.Linear(4, 1), env)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)


def forward(x, batch_size):
    # pretend rank 1's device holds no more than 24 samples
    if env.rank == 1 and batch_size > 24:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
    return model(x).pow(2).mean()


def train(batch_size, model, optimizer):
    for _ in range(3):
        x = torch.randn(batch_size, 4)
        try:
            loss = forward(x, batch_size)
        except torch.OutOfMemoryError:
            loss = None
        # every rank leaves the step together, before the backward's all-reduce
        if dl.any_rank(loss is None, env):
            raise torch.OutOfMemoryError("a rank ran out of memory in the forward")
        if sys.argv[1] == "fail" and env.rank == 1 and batch_size == 16:
            raise ValueError("the labels do not match the logits")
        dl.backward(loss, model)
        optimizer.step()
        optimizer.zero_grad()
    return batch_size


train = dl.find_executable_batch_size(train, env, 64)
print(f"rank {env.rank}: trained at batch size {train(model, optimizer)}", flush=True)
'''


def _launch(tmp_path: pathlib.Path, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
         "--timeout", "60", "train.py", mode], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=180)


def test_a_users_script_under_distlib_launch(tmp_path: pathlib.Path) -> None:
    (tmp_path / "train.py").write_text(SCRIPT)
    done = _launch(tmp_path, "ok")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 0: trained at batch size 16" in done.stdout
    assert "rank 1: trained at batch size 16" in done.stdout

    # rank 1 raises a real error at 16 while rank 0 goes on into the backward's all-reduce:
    # rank 1 does not wait for a verdict, so its exit releases rank 0 at once
    began = time.monotonic()
    done = _launch(tmp_path, "fail")
    assert time.monotonic() - began < 45  # not the 60 s collective timeout: nobody hangs
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "ValueError: the labels do not match the logits" in output
    assert "rank 0: trained" not in output and "rank 1: trained" not in output


def _out_of_memory_while_the_other_rank_is_in_a_collective(env: Any) -> dict[str, Any]:
    import torch

    import distlib as dl

    def train(batch_size: int) -> int:
        if env.rank == 1:  # runs out before the step's collective ...
            raise torch.OutOfMemoryError("CUDA out of memory.")
        dl.reduce(torch.ones(3), env, op="sum")  # ... which rank 0 waits in, alone
        return batch_size

    try:
        dl.find_executable_batch_size(train, env, 8)()
    except Exception as exc:  # what each rank raised is the result
        return {"error": type(exc).__name__, "message": str(exc)}
    return {}


def test_the_limit_an_out_of_memory_while_a_peer_is_in_a_collective_ends_at_the_timeout(
) -> None:
    began = time.monotonic()
    result = spawn(_out_of_memory_while_the_other_rank_is_in_a_collective, world_size=2,
                   timeout_s=120, collective_timeout_s=4)
    assert time.monotonic() - began < 60
    # both wait with the same timeout; whichever ends first, no rank retries on its own:
    # - rank 1 (waiting for a verdict rank 0, inside its collective, never posts) says so,
    #   and its exit then ends rank 0's wait with gloo's own error;
    # - or rank 0's collective times out first: it posts that failure, and rank 1 names it
    assert result[1]["error"] == "CollectiveError"
    message = result[1]["message"]
    waited = ("find_executable_batch_size(): every rank must report how its attempt at "
              "batch_size=8 ended, but got DistStoreError: ")
    named = ("find_executable_batch_size(): every rank's attempt must succeed or run out of "
             "memory, but at batch_size=8 got rank 0: ")
    assert message.startswith((waited, named)), message
    if message.startswith(waited):
        assert "see the training guide" in message
    assert result[0]["error"] == "RuntimeError"
    assert "find_executable_batch_size" not in result[0]["message"]
