"""What the collectives' agreement check costs, as ratios against raw torch.distributed.

Two gloo ranks started with distlib's launcher time three contenders per operation:
``raw`` (torch.distributed called directly, no distlib), ``unchecked`` (the distlib call
with ``check=False``) and ``checked`` (the default: one all-gather of an 8-byte fingerprint
per rank first). Operations: a 1 KB all-reduce (256 float32, ``dl.reduce(op="sum")`` vs
``dist.all_reduce`` of a clone) and a per-batch ``gather_metrics`` of 64 predictions (vs
``dist.all_gather`` + ``torch.cat``), plus a barrier (the check is the barrier itself). Ranks
meet at a barrier before each timed call, so the time is the call itself; contenders take
turns going first. The table shows microseconds per call (median over rounds) and the
ratios checked/raw, unchecked/raw and checked/unchecked.
Run: python benchmarks/collectives_check.py [--calls 500] [--rounds 7] [--world-size 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any


def _time(fn: Callable[[], Any], calls: int) -> float:
    import torch.distributed as dist

    spent = 0.0
    for _ in range(calls):
        dist.barrier()
        start = time.perf_counter()
        fn()
        spent += time.perf_counter() - start
    return spent / calls * 1e6


def _contenders(env: Any) -> dict[str, dict[str, Callable[[], Any]]]:
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    import distlib as dl

    kb = torch.randn(256)  # 1 KB of float32
    loader = dl.shard(DataLoader(torch.arange(64 * 2 * 4), batch_size=64), env)
    batch = next(iter(loader)).float()

    def raw_reduce() -> Any:
        out = kb.clone()
        dist.all_reduce(out)
        return out

    def raw_gather() -> Any:
        parts = [torch.empty_like(batch) for _ in range(env.world_size)]
        dist.all_gather(parts, batch)
        return torch.cat(parts)

    return {
        "all_reduce 1 KB": {
            "raw": raw_reduce,
            "unchecked": lambda: dl.reduce(kb, env, op="sum", check=False),
            "checked": lambda: dl.reduce(kb, env, op="sum")},
        "gather_metrics 64 rows": {
            "raw": raw_gather,
            "unchecked": lambda: dl.gather_metrics(batch, env, loader, check=False),
            "checked": lambda: dl.gather_metrics(batch, env, loader)},
        "barrier": {
            "raw": dist.barrier,
            "unchecked": lambda: dl.barrier(env, check=False),
            "checked": lambda: dl.barrier(env)},
    }


def _costs(calls: int, rounds: int) -> dict[str, dict[str, float]]:
    import distlib as dl
    from distlib.runtime import shutdown

    env = dl.detect(cpu=True)
    dl.barrier(env)  # joins the group
    table = _contenders(env)
    runs: dict[str, dict[str, list[float]]] = {op: {} for op in table}
    for number in range(rounds):
        for op, contenders in table.items():
            names = list(contenders)[::1 if number % 2 else -1]
            for name in names:
                contenders[name]()  # warm
                runs[op].setdefault(name, []).append(_time(contenders[name], calls))
    dl.barrier(env)
    shutdown()
    return {op: {name: statistics.median(times) for name, times in by_name.items()}
            for op, by_name in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    import distlib as dl

    result = dl.launch(_costs, args.calls, args.rounds, num_processes=args.world_size,
                       cpu=True, timeout_s=900)
    print(f"{args.world_size} gloo ranks, {args.calls} calls x {args.rounds} rounds, "
          "median us/call")
    print(f"{'rank':>4} {'operation':>24} {'raw':>8} {'unchecked':>10} {'checked':>8} "
          f"{'checked/raw':>12} {'unchecked/raw':>14} {'checked/unchecked':>18}")
    for rank, costs in enumerate(result):
        for op, t in costs.items():
            print(f"{rank:>4} {op:>24} {t['raw']:>8.0f} {t['unchecked']:>10.0f} "
                  f"{t['checked']:>8.0f} {t['checked'] / t['raw']:>12.2f} "
                  f"{t['unchecked'] / t['raw']:>14.2f} "
                  f"{t['checked'] / t['unchecked']:>18.2f}")


if __name__ == "__main__":
    main()
