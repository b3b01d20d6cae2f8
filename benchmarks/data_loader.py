"""Batches per second: distlib's sharded loader vs the raw DataLoader vs Accelerate's.

200,000 small samples (8 floats and a label), batch 64, one process and 2 gloo ranks started
with distlib's launcher. Each rank times full passes of every loader, interleaved, and keeps
the median (the loaders take turns going first); with 2 ranks the raw loader still reads the
whole dataset on each rank, so the rates compare the cost per batch. Time is the rank's CPU
time (``time.process_time``; the loaders use no worker processes), so other load on a shared
machine does not skew the ratios.
Target: the sharded loader at >= 0.98x of raw.
Run: python benchmarks/data_loader.py [--samples 200000] [--repeats 7] [--world-sizes 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def _rates(samples: int, batch: int, repeats: int) -> dict[str, float]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import distlib as dl

    env = dl.detect(cpu=True)
    data = TensorDataset(torch.randn(samples, 8), torch.randint(0, 10, (samples,)))

    def raw() -> Any:
        return DataLoader(data, batch_size=batch)

    loaders = {"raw": raw, "distlib": lambda: dl.shard(raw(), env)}
    if _has_accelerate():
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        loaders["accelerate"] = lambda: accelerator.prepare_data_loader(raw())
    built = {name: make() for name, make in loaders.items()}
    timings: dict[str, list[float]] = {name: [] for name in built}
    order = list(built.items())
    for number in range(repeats):
        # Rotate who goes first: back-to-back passes are not equally warm.
        for name, loader in order[number % len(order):] + order[:number % len(order)]:
            start, count = time.process_time(), 0
            for _batch in loader:
                count += 1
            timings[name].append(count / (time.process_time() - start))
    from distlib.runtime import shutdown

    shutdown()
    return {name: statistics.median(rates) for name, rates in timings.items()}


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    import distlib as dl

    print(f"{args.samples} samples, batch {args.batch_size}, median of {args.repeats} passes")
    print(f"{'ranks':>5} {'rank':>4} {'raw b/s':>9} {'distlib b/s':>12} {'accel b/s':>10} "
          f"{'distlib/raw':>12} {'accel/raw':>10}")
    for world in args.world_sizes:
        call = (_rates, args.samples, args.batch_size, args.repeats)
        per_rank = ([_rates(*call[1:])] if world == 1 else
                    list(dl.launch(*call, num_processes=world, cpu=True, timeout_s=900)))
        for rank, rates in enumerate(per_rank):
            acc = rates.get("accelerate", float("nan"))
            print(f"{world:>5} {rank:>4} {rates['raw']:>9.0f} {rates['distlib']:>12.0f} "
                  f"{acc:>10.0f} {rates['distlib'] / rates['raw']:>12.3f} "
                  f"{acc / rates['raw']:>10.3f}")


if __name__ == "__main__":
    main()
