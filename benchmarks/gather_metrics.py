"""Per-call cost of distlib's gather_metrics vs Accelerate's gather_for_metrics.

An evaluation pass over 10,001 samples (batch 64) on 2 gloo ranks started with distlib's
launcher: each batch's predictions are gathered and the padding dropped. Ranks meet at a
barrier before each timed call, so the time is the call itself, not the other rank's lag.
Both must return exactly 10,001 rows; the two take turns going first. Target: distlib no
slower than Accelerate.
Run: python benchmarks/gather_metrics.py [--samples 10001] [--passes 5] [--world-size 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def _pass(loader: Any, gather: Any, nested: bool) -> tuple[float, int, int]:
    import torch.distributed as dist

    spent, calls, rows = 0.0, 0, 0
    for features, _label in loader:
        preds = ({"score": features.sum(1), "top": features.argmax(1)} if nested
                 else features.sum(1))
        dist.barrier()
        start = time.perf_counter()
        got = gather(preds)
        spent += time.perf_counter() - start
        calls += 1
        rows += int((got["score"] if nested else got).shape[0])
    return spent / calls * 1e6, calls, rows


def _costs(samples: int, batch: int, passes: int) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    import distlib as dl

    env = dl.detect(cpu=True)
    dl.barrier(env)  # joins the group; Accelerate then finds it joined
    data = TensorDataset(torch.randn(samples, 8), torch.randint(0, 10, (samples,)))
    ours = dl.shard(DataLoader(data, batch_size=batch), env)
    accelerator = Accelerator(cpu=True)
    theirs = accelerator.prepare(DataLoader(data, batch_size=batch))
    runs: dict[str, list[tuple[float, int, int]]] = {}
    contenders = [("distlib", ours, lambda x: dl.gather_metrics(x, env, ours)),
                  ("accelerate", theirs, accelerator.gather_for_metrics)]
    for number in range(passes):
        for nested in (False, True):
            shape = "dict of 2 tensors" if nested else "one tensor"
            # Alternate who goes first: the second of two back-to-back passes runs warmer.
            for name, loader, gather in contenders[::1 if number % 2 else -1]:
                runs.setdefault(f"{name} {shape}", []).append(_pass(loader, gather, nested))
    dl.barrier(env)
    from distlib.runtime import shutdown

    shutdown()
    return {name: (statistics.median(r[0] for r in rs), rs[0][1], rs[0][2])
            for name, rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=10_001)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    import distlib as dl

    result = dl.launch(_costs, args.samples, args.batch_size, args.passes,
                       num_processes=args.world_size, cpu=True, timeout_s=900)
    print(f"{args.samples} samples, batch {args.batch_size}, {args.world_size} ranks, "
          f"median over {args.passes} passes")
    print(f"{'rank':>4} {'outputs':>18} {'distlib us/call':>16} {'accel us/call':>14} "
          f"{'distlib/accel':>14} {'rows (distlib, accel)':>22}")
    for rank, costs in enumerate(result):
        for shape in ("one tensor", "dict of 2 tensors"):
            ours, theirs = costs[f"distlib {shape}"], costs[f"accelerate {shape}"]
            print(f"{rank:>4} {shape:>18} {ours[0]:>16.0f} {theirs[0]:>14.0f} "
                  f"{ours[0] / theirs[0]:>14.3f} {f'{ours[2]}, {theirs[2]}':>22}")


if __name__ == "__main__":
    main()
