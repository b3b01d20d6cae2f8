"""bf16 training steps/s on one GPU: the example's model under distlib vs the same loop in raw torch.

    python benchmarks/gpu_train.py             # on a GPU machine
    python benchmarks/gpu_train.py --dry-run   # a few steps on the CPU (the test suite)

The model is examples/train.py's ``CharModel`` at the example's size and at a wider size (where
the GPU, not Python, is the limit). distlib: ``wrap`` (Single, bf16) + ``shard`` + ``backward``;
raw torch: the same model, ``torch.autocast("cuda", torch.bfloat16)``, batches moved by hand.
Steps/s is measured after a warm-up, best of two; the ratio is distlib / raw (1.0 = no overhead).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch
from _gpu_common import device_or_skip, emit, parser, sync

NAME = "gpu_train"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))


def _data(vocab: int, rows: int, context: int) -> Any:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (rows, context), generator=g)
    return torch.utils.data.TensorDataset(x, torch.randint(0, vocab, (rows,), generator=g))


def _steps_per_s(loop: Any, steps: int, device: str) -> float:
    loop(3)  # warm-up
    best = float("inf")
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        loop(steps)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return steps / best


def _case(width: int, depth: int, steps: int, device: str) -> dict[str, Any]:
    import train as example  # examples/train.py

    import distlib as dl

    vocab, context, batch = 96, example.CONTEXT, 64
    data = _data(vocab, batch * 16, context)
    loss_fn = torch.nn.CrossEntropyLoss()
    dtype = torch.bfloat16

    def ours(n: int) -> None:
        env = dl.Env(device=device, backend="nccl" if device != "cpu" else "gloo",
                     precision="bf16")
        torch.manual_seed(0)
        model = example.CharModel(vocab, width=width, depth=depth)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, opt = dl.wrap(model, dl.Single(), env=env, optimizer=opt)
        loader = dl.shard(torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True), env)
        done = 0
        while done < n:
            for x, y in loader:
                dl.backward(loss_fn(model(x), y), model)
                opt.step()
                opt.zero_grad()
                done += 1
                if done == n:
                    break

    def raw(n: int) -> None:
        torch.manual_seed(0)
        model = example.CharModel(vocab, width=width, depth=depth).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True)
        done = 0
        while done < n:
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                with torch.autocast(torch.device(device).type, dtype=dtype):
                    loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                done += 1
                if done == n:
                    break

    ours_rate = _steps_per_s(ours, steps, device)
    raw_rate = _steps_per_s(raw, steps, device)
    return {"width": width, "depth": depth, "steps_per_s": {"distlib": round(ours_rate, 1),
                                                            "raw_torch": round(raw_rate, 1)},
            "ratio_distlib_to_raw": round(ours_rate / raw_rate, 3)}


def main() -> int:
    args = parser(__doc__).parse_args()
    device = device_or_skip(args, NAME)
    if device is None:
        return 0
    steps = 5 if args.dry_run else 200
    sizes = [(128, 2)] if args.dry_run else [(128, 2), (1024, 8)]
    cases = [_case(w, d, steps, device) for w, d in sizes]
    emit(args, {"benchmark": NAME, "dry_run": args.dry_run, "precision": "bf16",
                "device": torch.cuda.get_device_name(0) if device != "cpu" else "cpu",
                "cases": cases})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
