"""Training steps per second: `wrap`'s DDP vs raw DDP vs Accelerate vs Lightning Fabric.

2 gloo ranks on this machine (started with distlib's launcher), an MLP 512-2048-512, batch 64
per rank, SGD, 200 steps per measurement. Every rank runs the four loops in turn, several
rounds interleaved in a rotating order (so load from elsewhere on a shared machine hits all
of them alike), and rank 0 keeps each loop's median rate by wall clock and by CPU time.
Ratios are against raw DDP; target: `wrap` within 2% (ratio >= 0.98). One torch thread per
rank, so two ranks fit two cores.

The distlib loop is the contract loop: ``dl.accumulate(loader, steps=1)`` and ``dl.backward``.
Run: python benchmarks/train_step.py [--steps 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any


def _mlp() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(),
                               torch.nn.Linear(2048, 512))


def _time(run: Callable[[list[Any]], None], batches: list[Any]) -> tuple[float, float]:
    """Steps per second of ``run`` over ``batches``: by wall clock and by this rank's CPU time.

    All ranks start and stop together. CPU time counts only what this process spent (its
    compute and communication threads), so load from elsewhere on a shared machine skews it
    far less than the wall clock.
    """
    import torch.distributed as dist

    run(batches[:10])  # warm up (buckets, allocator)
    dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    run(batches)
    cpu = time.process_time() - cpu
    dist.barrier()
    return len(batches) / (time.perf_counter() - wall), len(batches) / cpu


def _loops(env: Any) -> dict[str, Callable[[list[Any]], tuple[float, float]]]:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    import distlib as dl

    mse = torch.nn.functional.mse_loss

    def raw(batches: list[Any]) -> tuple[float, float]:
        model = DistributedDataParallel(_mlp())
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def run(items: list[Any]) -> None:
            for x, y in items:
                mse(model(x), y).backward()
                opt.step()
                opt.zero_grad()
        return _time(run, batches)

    def distlib(batches: list[Any]) -> tuple[float, float]:
        module = _mlp()
        model, opt = dl.wrap(module, dl.DDP(), env=env,
                             optimizer=torch.optim.SGD(module.parameters(), lr=1e-3))

        def run(items: list[Any]) -> None:
            for (x, y), micro in dl.accumulate(items, steps=1):
                dl.backward(mse(model(x), y), model, micro)
                if micro.sync:
                    opt.step()
                    opt.zero_grad()
        return _time(run, batches)

    loops = {"raw DDP": raw, "distlib wrap": distlib}
    try:
        from accelerate import Accelerator
    except ImportError:
        pass
    else:
        accelerator = Accelerator(cpu=True)

        def accelerate(batches: list[Any]) -> tuple[float, float]:
            module = _mlp()
            model, opt = accelerator.prepare(module, torch.optim.SGD(module.parameters(), lr=1e-3))

            def run(items: list[Any]) -> None:
                for x, y in items:
                    accelerator.backward(mse(model(x), y))
                    opt.step()
                    opt.zero_grad()
            return _time(run, batches)
        loops["Accelerate"] = accelerate
    try:
        from lightning.fabric import Fabric
    except ImportError:
        pass
    else:
        fabric = Fabric(accelerator="cpu", devices=env.world_size, strategy="ddp")
        fabric.launch()  # under a launcher's variables this only sets the ranks up

        def lightning(batches: list[Any]) -> tuple[float, float]:
            module = _mlp()
            model, opt = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=1e-3))

            def run(items: list[Any]) -> None:
                for x, y in items:
                    fabric.backward(mse(model(x), y))
                    opt.step()
                    opt.zero_grad()
            return _time(run, batches)
        loops["Fabric"] = lightning
    return loops


def _bench(steps: int, rounds: int) -> dict[str, tuple[float, float]]:
    import torch

    import distlib as dl
    from distlib.runtime import initialize, shutdown

    torch.set_num_threads(1)
    env = dl.detect(cpu=True)
    initialize(env)
    g = torch.Generator().manual_seed(env.rank)
    batches = [(torch.randn(64, 512, generator=g), torch.randn(64, 512, generator=g))
               for _ in range(steps)]
    loops = _loops(env)
    names = list(loops)
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in loops}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
            rates[name].append(loops[name](batches))
    shutdown()
    return {name: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r))
            for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from distlib.launcher.launcher import launch

    result = launch(_bench, args.steps, args.rounds, num_processes=2, cpu=True, timeout_s=1800)
    rates = result[0]
    wall0, cpu0 = rates["raw DDP"]
    print(f"2 gloo ranks, MLP 512-2048-512, batch 64/rank, {args.steps} steps, "
          f"median of {args.rounds} rounds (order rotated each round), rank 0")
    print(f"{'loop':<14} {'wall steps/s':>13} {'vs raw':>7} {'CPU steps/s':>12} {'vs raw':>7}")
    for name, (wall, cpu) in rates.items():
        print(f"{name:<14} {wall:13.2f} {wall / wall0:6.3f}x {cpu:12.2f} {cpu / cpu0:6.3f}x")

if __name__ == "__main__":
    main()
