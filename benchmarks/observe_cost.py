"""What seeing the run costs: a training loop with `StepMeter` and trackers vs the same loop bare.

2 gloo ranks (distlib's launcher), an MLP 512-2048-512, batch 64 per rank, SGD, 200 steps per
measurement. Three loops: bare; with ``meter.step`` every step (a report every 10 steps: one
all-gather); with the meter and ``trackers.log`` of the loss (a tensor, ``reduce="mean"``: one
all-reduce) and the report every 10 steps to JSONL and TensorBoard. Several rounds interleaved
in a rotating order (load from elsewhere hits all alike); rank 0 keeps each loop's median CPU
time. Ratios are time per step against the bare loop; target: <= 1.01. On a shared machine the
loops' difference drowns in noise, so the meter's and the trackers' own cost is also measured
alone (20 x steps calls, no training) and shown added to the bare step. One torch thread per rank.

Run: python benchmarks/observe_cost.py [--steps 200] [--rounds 5] [--log-every 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any


def _bench(env: Any, steps: int, rounds: int, log_every: int) -> dict[str, float]:
    import torch

    import distlib as dl

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = dl.wrap(torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(),
                                        torch.nn.Linear(2048, 512)), env)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 512), torch.randn(64, 512)
    folder = tempfile.mkdtemp(prefix="observe_cost_")

    def train() -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(x), y)
        dl.backward(loss, model)
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    def bare() -> None:
        for _ in range(steps):
            train()

    def metered() -> None:
        meter = dl.StepMeter(env, log_every=log_every)
        for _ in range(steps):
            train()
            meter.step(samples=64, tokens=64 * 512)

    def tracked() -> None:
        meter = dl.StepMeter(env, log_every=log_every)
        with dl.init_trackers(env, ["jsonl", "tensorboard"], project_dir=folder) as run:
            for step in range(steps):
                loss = train()
                report = meter.step(samples=64, tokens=64 * 512)
                if step % log_every == 0:
                    run.log({"loss": loss}, step=step)
                if report:
                    run.log(report, step=step)

    def alone(n: int, with_trackers: bool) -> float:
        """Seconds per step of the meter (and trackers) with no training around them."""
        meter = dl.StepMeter(env, log_every=log_every)
        loss = torch.tensor(0.5)
        with dl.init_trackers(env, ["jsonl", "tensorboard"] if with_trackers else [],
                              project_dir=folder) as run:
            dl.barrier(env)
            start = time.process_time()
            for step in range(n):
                report = meter.step(samples=64, tokens=64 * 512)
                if with_trackers and step % log_every == 0:
                    run.log({"loss": loss}, step=step)
                if with_trackers and report:
                    run.log(report, step=step)
            return (time.process_time() - start) / n

    loops = {"bare": bare, "meter": metered, "meter+trackers": tracked}
    times: dict[str, list[float]] = {name: [] for name in loops}
    bare()  # warm up
    names = list(loops)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            dl.barrier(env)
            start = time.process_time()
            loops[name]()
            times[name].append((time.process_time() - start) / steps)
    out = {name: statistics.median(t) for name, t in times.items()}
    out["meter alone"] = statistics.median(alone(20 * steps, False) for _ in range(rounds))
    out["meter+trackers alone"] = statistics.median(alone(20 * steps, True)
                                                    for _ in range(rounds))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    from distlib.testing import spawn

    result = spawn(_bench, args.steps, args.rounds, args.log_every, world_size=2,
                   timeout_s=1800)
    per_step = result[0]
    base = per_step["bare"]
    print(f"2 gloo ranks, MLP 512-2048-512, batch 64/rank, {args.steps} steps, report every "
          f"{args.log_every}, median of {args.rounds} rounds, CPU time of rank 0")
    print(f"{'loop':<22} {'ms/step':>9} {'vs bare':>8}")
    for name in ("bare", "meter", "meter+trackers"):
        print(f"{name:<22} {per_step[name] * 1e3:9.3f} {per_step[name] / base:7.3f}x")
    print("the same cost measured alone (no training around it), added to the bare step:")
    for name in ("meter alone", "meter+trackers alone"):
        cost = per_step[name]
        print(f"{name:<22} {cost * 1e3:9.4f} {(base + cost) / base:7.4f}x")


if __name__ == "__main__":
    main()
