"""Survive a crash: save_state every few steps, load_state at start, let the launcher restart.

    distlib launch --cpu --num-processes 2 --max-restarts 1 examples/resume.py --crash-at 6

On its first attempt rank 1 dies at step --crash-at (after the checkpoint of that step). The
launcher restarts the whole group; each rank finds the checkpoint, loads the model, the
optimizer, the loader's position and its RNG state, and carries on. The final weights are
exactly those of a run that never crashed (the test suite checks this).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import distlib as dl
from distlib.checkpoint import is_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps in all")
    parser.add_argument("--every", type=int, default=2, help="save every N steps")
    parser.add_argument("--out", default="checkpoints/resume", help="checkpoint folder")
    parser.add_argument("--crash-at", type=int, default=-1, help="rank 1 dies at this step once")
    parser.add_argument("--result", default=None, help="write the final weights here (rank 0)")
    args = parser.parse_args()

    env = dl.detect()
    dl.seed(0, env)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = dl.wrap(model, env, optimizer=optimizer)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(96, 10, generator=g),
                                          torch.randn(96, 1, generator=g))
    loader = dl.shard(torch.utils.data.DataLoader(
        data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1)), env)

    step, out = 0, Path(args.out)
    if is_checkpoint(out):  # also finds the last save when a crash hit between its renames
        step = dl.load_state(out, env, model=model, optimizer=optimizer, loader=loader)["step"]
        if env.is_main:
            print(f"attempt {env.restart_count}: resumed from step {step}", flush=True)
    while step < args.steps:
        for x, y in loader:
            loss = torch.nn.functional.mse_loss(model(x), y)
            dl.backward(loss, model)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % args.every == 0:
                dl.save_state(out, env, model=model, optimizer=optimizer, loader=loader,
                              step=step)
            if step == args.crash_at and env.restart_count == 0 and env.rank == 1:
                raise RuntimeError(f"simulated crash of rank 1 at step {step}")
            if step == args.steps:
                break
    if args.result and env.is_main:
        torch.save({k: v.detach().cpu() for k, v in dl.unwrap(model).state_dict().items()},
                   args.result)
    if env.is_main:
        print(f"done at step {step}, loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
