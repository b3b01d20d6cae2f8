"""Load a ~2 GB safetensors checkpoint straight to the GPU: distlib vs Accelerate vs safetensors.

    python benchmarks/gpu_load.py                 # on a GPU machine (builds the checkpoint)
    python benchmarks/gpu_load.py --dry-run       # a tiny checkpoint on the CPU (the test suite)

The floor is safetensors' own ``load_file(file, device="cuda")`` over the shards; distlib's
``load_checkpoint_and_dispatch(model, folder, {"": 0})`` and Accelerate's call of the same name
fill an empty transformers model. Each is timed best of two, alternating, with the files in the
page cache (so this measures the path to the GPU, not the disk), GPU memory freed in between.
"""

from __future__ import annotations

import gc
import glob
import os
import tempfile
from typing import Any

import torch
from _gpu_common import (
    best_of,
    config_for_bytes,
    device_or_skip,
    emit,
    parser,
    sync,
    write_checkpoint,
)

NAME = "gpu_load"


def _empty(config: Any, lib: str) -> Any:
    import transformers

    if lib == "accelerate":
        from accelerate import init_empty_weights
    else:
        from distlib import init_empty_weights
    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--size-gb", type=float, default=2.0)
    args = p.parse_args()
    device = device_or_skip(args, NAME)
    if device is None:
        return 0
    size = 5e5 if args.dry_run else args.size_gb * 1e9
    config = config_for_bytes(size, hidden=64 if args.dry_run else 2048,
                              vocab=256 if args.dry_run else 32000)
    folder = args.folder or tempfile.mkdtemp(prefix="distlib-gpu-load-")
    built = write_checkpoint(config, folder, torch.bfloat16, device)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    target: Any = 0 if device.startswith("cuda") else "cpu"

    def floor() -> int:
        from safetensors.torch import load_file

        n = 0
        for f in files:
            n += sum(t.numel() for t in load_file(f, device=device).values())
        sync(device)
        return n

    def ours() -> Any:
        import distlib as dl

        model = dl.load_checkpoint_and_dispatch(_empty(config, "distlib"), folder,
                                                {"": target}, quiet=True)
        sync(device)
        return model

    def theirs() -> Any:
        from accelerate import load_checkpoint_and_dispatch

        model = load_checkpoint_and_dispatch(_empty(config, "accelerate"), folder,
                                             device_map={"": target})
        sync(device)
        return model

    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # the CUDA context is not part of any load
    floor()  # warm the page cache once
    times: dict[str, float] = {}
    checks: dict[str, float] = {}
    for _round in range(2):
        for name, fn in (("safetensors", floor), ("distlib", ours), ("accelerate", theirs)):
            seconds, value = best_of(1, fn)
            times[name] = min(times.get(name, float("inf")), seconds)
            if name != "safetensors":
                weight = value.model.layers[-1].mlp.down_proj.weight
                checks[name] = float(weight.detach().float().sum())
                assert weight.device.type == torch.device(device).type, weight.device
            del value
            _free()
    same = abs(checks["distlib"] - checks["accelerate"]) <= 1e-3 * max(1.0, abs(checks["accelerate"]))
    result = {
        "benchmark": NAME, "device": torch.cuda.get_device_name(0) if device != "cpu" else "cpu",
        "dry_run": args.dry_run, "checkpoint_bytes": built["bytes"], "files": built["files"],
        "build_s": round(built["seconds"], 2),
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "gb_per_s": {k: round(built["bytes"] / v / 1e9, 2) for k, v in times.items()},
        "ratio_distlib_to_safetensors": round(times["distlib"] / times["safetensors"], 2),
        "ratio_distlib_to_accelerate": round(times["distlib"] / times["accelerate"], 2),
        "same_weights": same,
    }
    emit(args, result)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
