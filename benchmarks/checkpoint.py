"""save_state / load_state vs torch.distributed.checkpoint used directly, FSDP2 over 2 ranks.

Each variant runs in its own 2-rank launch (so peak memory is its own): an FSDP2 MLP with AdamW
state (about --mb MB of weights, three times that with the optimizer), saved and loaded
--repeats times. Reports the median save and load time and the peak RSS growth per rank, and
the ratio distlib / DCP. Target: distlib adds no more than 5%.

Then the time a training loop is blocked per save, ``save_state`` sync vs ``async_save=True``
(each with its defaults, same model, side by side): the loop saves, trains --steps steps, and
(async) waits for the handle before the next save; blocked time is the time inside
``save_state`` plus, for async, what ``wait()`` still had to wait. Reported as async / sync.

Run: python benchmarks/checkpoint.py [--mb 128] [--repeats 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import pathlib
import resource
import statistics
import tempfile
import time
from typing import Any

import distlib as dl


def _model(mb: int) -> Any:
    import torch

    width = 1024
    layers = max(1, mb * 2**20 // (width * width * 4))
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _direct_save(model: Any, optimizer: Any, path: pathlib.Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=path)


def _direct_load(model: Any, optimizer: Any, path: pathlib.Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def _job(env: Any, variant: str, folder: str, mb: int, repeats: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    model = _model(mb)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = dl.wrap(model, dl.FSDP(), env=env, optimizer=optimizer)
    model(torch.randn(4, 1024)).sum().backward()
    optimizer.step()
    base = _rss_mb()
    saves, loads = [], []
    for i in range(repeats):
        path = pathlib.Path(folder) / f"{variant}-{i}"
        dist.barrier()
        t0 = time.perf_counter()
        if variant == "distlib":
            dl.save_state(path, env, model=model, optimizer=optimizer)
        else:
            _direct_save(model, optimizer, path)
        dist.barrier()
        t1 = time.perf_counter()
        if variant == "distlib":
            dl.load_state(path, env, model=model, optimizer=optimizer, rng=False)
        else:
            _direct_load(model, optimizer, path)
        dist.barrier()
        t2 = time.perf_counter()
        saves.append(t1 - t0)
        loads.append(t2 - t1)
    return {"save": statistics.median(saves), "load": statistics.median(loads),
            "peak_growth_mb": _peak_mb() - base}


def _blocked(env: Any, mode: str, folder: str, mb: int, repeats: int, steps: int) -> dict[str, Any]:
    """Seconds the loop is blocked per save (median), saving every ``steps`` training steps."""
    import torch
    import torch.distributed as dist

    model = _model(mb)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = dl.wrap(model, dl.FSDP(), env=env, optimizer=optimizer)
    x = torch.randn(64, 1024)

    def step() -> None:
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    blocked, train = [], []
    for i in range(repeats):
        path = pathlib.Path(folder) / f"{mode}_{i}"
        dist.barrier()
        t0 = time.perf_counter()
        handle = dl.save_state(path, env, async_save=mode == "async", model=model,
                               optimizer=optimizer, step=i)
        t1 = time.perf_counter()
        for _ in range(steps):
            step()
        t2 = time.perf_counter()
        if mode == "async":
            handle.wait()
        t3 = time.perf_counter()
        blocked.append((t1 - t0) + (t3 - t2))
        train.append(t2 - t1)
    return {"blocked": statistics.median(blocked), "train": statistics.median(train)}


def _blocked_rank(mode: str, folder: str, mb: int, repeats: int, steps: int) -> dict[str, Any]:
    from distlib import runtime

    env = dl.detect()
    with runtime.process_group(env):
        return _blocked(env, mode, folder, mb, repeats, steps)


def _report_blocked(folder: str, mb: int, repeats: int, steps: int) -> None:
    results: dict[str, list[dict[str, Any]]] = {}
    for mode in ("sync", "async", "sync", "async"):  # interleaved: fair to both
        out = dl.launch(_blocked_rank, mode, tempfile.mkdtemp(dir=folder), mb, repeats, steps,
                        num_processes=2, cpu=True, timeout_s=1200)
        results.setdefault(mode, []).append({k: max(r[k] for r in out) for k in out[0]})
    best = {m: {k: min(r[k] for r in runs) for k in runs[0]} for m, runs in results.items()}
    print(f"\ntraining loop blocked per save, {steps} steps between saves, median of {repeats}")
    print(f"{'save_state':<12} {'blocked s':>10} {'steps s':>9}")
    for mode, row in best.items():
        print(f"{mode:<12} {row['blocked']:>10.2f} {row['train']:>9.2f}")
    print(f"async / sync blocked time: {best['async']['blocked'] / best['sync']['blocked']:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=128, help="weights in MB (fp32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="training steps between saves")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for variant in ("dcp", "distlib", "dcp", "distlib"):  # interleaved: fair to both
            out = dl.launch(_run_rank, variant, tempfile.mkdtemp(dir=folder),
                            args.mb, args.repeats, num_processes=2, cpu=True, timeout_s=1200)
            runs = results.setdefault(variant, [])
            runs.append({k: max(r[k] for r in out) for k in out[0]})
    print(f"FSDP2, 2 ranks, {args.mb} MB of weights (+ AdamW state), median of {args.repeats}")
    print(f"{'variant':<10} {'save s':>8} {'load s':>8} {'peak RSS growth MB':>20}")
    best = {v: {k: min(r[k] for r in runs) for k in runs[0]} for v, runs in results.items()}
    for variant, row in best.items():
        print(f"{variant:<10} {row['save']:>8.2f} {row['load']:>8.2f} {row['peak_growth_mb']:>20.0f}")
    ratio = {k: best["distlib"][k] / best["dcp"][k] for k in ("save", "load")}
    print(f"distlib / dcp: save {ratio['save']:.3f}x, load {ratio['load']:.3f}x "
          f"(target <= 1.05x: {'OK' if max(ratio.values()) <= 1.05 else 'MISSED'})")
    with tempfile.TemporaryDirectory() as folder:
        _report_blocked(folder, args.mb, args.repeats, args.steps)


def _run_rank(variant: str, folder: str, mb: int, repeats: int) -> dict[str, Any]:
    from distlib import runtime

    env = dl.detect()
    with runtime.process_group(env):
        return _job(env, variant, folder, mb, repeats)


if __name__ == "__main__":
    main()
