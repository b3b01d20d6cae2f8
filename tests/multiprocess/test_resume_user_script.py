"""A user's script shaped like Accelerate's examples, through `distlib launch` (2 CPU ranks).

The script (this file, run as ``__main__``) seeds with ``dl.seed(42, env)``, trains a small
model with dropout on a ``DataLoader(shuffle=True)`` without a generator, and resumes with
Accelerate's arithmetic (``starting_epoch = resume_step // len(loader)`` and
``skip_first_batches``). Three launches: straight through; stopped at step 7 of 15 with
`save_state`; resumed with `load_state` in a new job. The per-step losses must repeat bitwise
between the first two, and the resumed run must train the 8 missing steps with exactly the
straight run's losses. Scenario B (one worker per rank, noise drawn in the worker, ranks
seeded apart) must repeat too, and its shuffled shards must stay disjoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.data import skip_first_batches

pytestmark = pytest.mark.multiprocess

EPOCHS, STOP_AT, SAMPLES, BATCH = 3, 7, 40, 4  # 5 steps per rank and epoch, 15 in all
TIMEOUT = 240


class Rows(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """Fixed rows plus noise drawn at read time (in the worker that reads them, if any)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(SAMPLES, 8, generator=g), torch.randn(SAMPLES, 1, generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i] + 0.01 * torch.randn(8), self.y[i], i


def _train(env: Any, *, workers: int, stop_at: int | None, resume: str | None,
           folder: Path) -> dict[str, Any]:
    """The user's script: what Accelerate's nlp_example does, on distlib."""
    dl.seed(42, env, device_specific=workers > 0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = dl.wrap(model, env, optimizer=optimizer)
    loader = dl.shard(torch.utils.data.DataLoader(Rows(), batch_size=BATCH, shuffle=True,
                                                  num_workers=workers), env)
    starting_epoch, resume_step, overall_step = 0, None, 0
    if resume is not None:
        values = dl.load_state(resume, env, model=model, optimizer=optimizer, loader=loader)
        resume_step = overall_step = int(values["step"])
        starting_epoch = resume_step // len(loader)
        resume_step -= starting_epoch * len(loader)
    losses, seen = [], []
    for epoch in range(starting_epoch, EPOCHS):
        model.train()
        active = (skip_first_batches(loader, resume_step)
                  if resume_step is not None and epoch == starting_epoch else loader)
        for x, y, index in active:
            loss = torch.nn.functional.mse_loss(model(x), y)
            dl.backward(loss, model)
            optimizer.step()
            optimizer.zero_grad()
            overall_step += 1
            losses.append(loss.item())
            seen.append(index.tolist())
            if overall_step == stop_at:
                dl.save_state(folder / f"step_{overall_step}", env, model=model,
                              optimizer=optimizer, loader=loader, step=overall_step)
                return {"losses": losses, "seen": seen, "len": len(loader)}
    return {"losses": losses, "seen": seen, "len": len(loader),
            "starting_epoch": starting_epoch}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", choices=["straight", "stop", "resume"], required=True)
    args = parser.parse_args()
    env = dl.detect()
    ckpt = args.out.parent / "ckpt"
    report = {}
    if args.mode == "resume":
        report["A"] = _train(env, workers=0, stop_at=None, resume=str(ckpt / f"step_{STOP_AT}"),
                             folder=ckpt)
    else:
        report["A"] = _train(env, workers=0, stop_at=STOP_AT if args.mode == "stop" else None,
                             resume=None, folder=ckpt)
        report["B"] = _train(env, workers=1, stop_at=None, resume=None, folder=ckpt)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{env.rank}.json").write_text(json.dumps(report))


def _launch(mode: str, out: Path) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
               __file__, "--mode", mode, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_accelerate_shaped_script_repeats_and_resumes_exactly(tmp_path: Path) -> None:
    straight = _launch("straight", tmp_path / "straight")
    stopped = _launch("stop", tmp_path / "stop")
    resumed = _launch("resume", tmp_path / "resume")
    per_epoch = SAMPLES // BATCH // 2
    for rank in range(2):
        a = straight[rank]["A"]
        assert len(a["losses"]) == EPOCHS * per_epoch and a["len"] == per_epoch
        # Two runs with dl.seed(42, env) and no generator: the same losses, bitwise.
        assert stopped[rank]["A"]["losses"] == a["losses"][:STOP_AT], rank
        assert stopped[rank]["B"]["losses"] == straight[rank]["B"]["losses"], rank
        # The resumed job: len() is the epoch, so it starts in epoch 1 and trains 8 steps,
        # with the dropout masks and batches of the straight run.
        after = resumed[rank]["A"]
        assert (after["len"], after["starting_epoch"]) == (per_epoch, STOP_AT // per_epoch)
        assert after["seen"] == a["seen"][STOP_AT:], rank
        assert after["losses"] == a["losses"][STOP_AT:], rank
    for name in ("A", "B"):  # one shuffle seed (rank 0's): each epoch's shards are disjoint
        for epoch in range(EPOCHS):
            rows = [i for r in range(2) for batch in
                    straight[r][name]["seen"][epoch * per_epoch:(epoch + 1) * per_epoch]
                    for i in batch]
            assert sorted(rows) == list(range(SAMPLES)), (name, epoch)
    assert straight[0]["A"]["seen"][:per_epoch] != straight[0]["A"]["seen"][per_epoch:][
        :per_epoch]  # epochs reshuffle


if __name__ == "__main__":
    main()
