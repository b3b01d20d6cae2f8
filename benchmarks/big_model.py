"""Big-model inference, distlib beside Accelerate, in one run.

    python benchmarks/big_model.py --size-gb 1.7          # the issue's model (about 1.7 GB fp32)
    python benchmarks/big_model.py --size-gb 0.3 --quick  # a smaller run

Cases (each load runs in a fresh subprocess, so peak RSS is its own):
  (a) empty init of the Llama-style model: time and RSS growth;
  (b) load_checkpoint_and_dispatch to the CPU vs reading the same files with safetensors
      alone (the floor): wall time, peak RSS growth vs the checkpoint size;
  (c) max_memory={"cpu": "600MB"} with disk offload: load time, peak RSS growth, one forward;
  (d) infer_device_map time for 100 / 1,000 / 10,000 / 100,000 leaf modules.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

LAYER_PARAMS = 4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024  # attention + mlp + norms


def _config(size_gb: float) -> Any:
    import transformers

    fixed = 2 * 32000 * 1024 * 4  # embeddings and lm_head, fp32
    layers = max(1, round((size_gb * 1e9 - fixed) / (LAYER_PARAMS * 4)))
    return transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816,
                                    num_attention_heads=16, num_key_value_heads=16,
                                    num_hidden_layers=layers, vocab_size=32000)


def _empty_model(size_gb: float, lib: str) -> Any:
    import transformers

    if lib == "accelerate":
        from accelerate import init_empty_weights
    else:
        from distlib import init_empty_weights
    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(_config(size_gb)).eval()


def write_checkpoint(size_gb: float, folder: str, shard_bytes: int = 400 * 10**6) -> int:
    """Write random weights as sharded safetensors with an index; return the bytes written."""
    import torch
    from safetensors.torch import save_file

    model = _empty_model(size_gb, "distlib")
    shards: list[dict[str, Any]] = [{}]
    sizes = [0]
    for name, param in model.named_parameters():
        nbytes = param.numel() * 4
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = param.shape
        sizes[-1] += nbytes
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for index, shapes in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: torch.randn(s, generator=generator) * 0.02 for n, s in shapes.items()}
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shapes, file))
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, handle)
    return sum(sizes)


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load(lib: str, model: Any, folder: str, device_map: Any, **kwargs: Any) -> Any:
    if lib == "accelerate":
        from accelerate import load_checkpoint_and_dispatch

        return load_checkpoint_and_dispatch(model, folder, device_map=device_map, **kwargs)
    from distlib import load_checkpoint_and_dispatch

    return load_checkpoint_and_dispatch(model, folder, device_map, quiet=True, **kwargs)


def _touch(tensors: Any) -> None:
    """Read one element per 4 KiB page of every tensor, so lazily mapped pages are in."""
    for tensor in tensors:
        if not tensor.is_meta and tensor.numel():
            flat = tensor.reshape(-1)
            float(flat[:: max(1, 4096 // flat.element_size())].float().sum())


def run_case(case: str, lib: str, size_gb: float, folder: str,
             cpu_budget: str = "600MB") -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    _empty_model(0.0, lib)  # import the model code and warm up: time the init, not imports
    if case == "empty":
        base, start = _rss(), time.perf_counter()
        _empty_model(size_gb, lib)
        return {"seconds": time.perf_counter() - start, "rss_growth": _rss() - base}
    if case == "floor":
        from safetensors.torch import load_file

        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        base, start = _rss(), time.perf_counter()
        state = {}
        for file in files:
            state.update(load_file(os.path.join(folder, file)))
        seconds = time.perf_counter() - start
        _touch(state.values())
        return {"seconds": seconds, "seconds_with_touch": time.perf_counter() - start,
                "peak_growth": _peak() - base}
    model = _empty_model(size_gb, lib)
    base, start = _rss(), time.perf_counter()
    if case == "cpu":
        _load(lib, model, folder, {"": "cpu"})
        seconds = time.perf_counter() - start
        _touch(model.state_dict().values())
        return {"seconds": seconds, "seconds_with_touch": time.perf_counter() - start,
                "peak_growth": _peak() - base}
    with tempfile.TemporaryDirectory(prefix="offload-") as offload:
        return _offload_case(lib, model, folder, cpu_budget, offload, base, start)


def _offload_case(lib: str, model: Any, folder: str, cpu_budget: str, offload: str, base: int,
                  start: float) -> dict[str, Any]:
    import torch

    model = _load(lib, model, folder, "auto", max_memory={"cpu": cpu_budget},
                  no_split_module_classes=["LlamaDecoderLayer"], offload_folder=offload)
    loaded = time.perf_counter() - start
    resident = _rss() - base
    ids = torch.randint(0, 32000, (1, 16))
    with torch.no_grad():
        forward_start = time.perf_counter()
        model(ids)
        forward = time.perf_counter() - forward_start
    on_disk = sum(1 for d in model.hf_device_map.values() if d == "disk")
    return {"seconds": loaded, "forward_seconds": forward, "resident_after_load": resident,
            "peak_growth": _peak() - base, "disk_entries": on_disk}


def _subprocess(case: str, lib: str, size_gb: float, folder: str, cpu_budget: str = "600MB",
                repeat: int = 1) -> dict[str, Any]:
    """Run a case ``repeat`` times, each in a fresh process; keep the fastest run."""
    command = [sys.executable, __file__, "--case", case, "--lib", lib, "--size-gb", str(size_gb),
               "--folder", folder, "--cpu-budget", cpu_budget]
    runs = []
    for _ in range(repeat):
        out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=3600)
        if out.returncode != 0:
            return {"error": out.stderr.strip().splitlines()[-1:]}
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda r: r["seconds"])


def _leaf_model(num_leaves: int) -> Any:
    import torch

    from distlib import init_empty_weights

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(10))

    with init_empty_weights():
        return torch.nn.Sequential(*[Block() for _ in range(max(1, num_leaves // 10))])


def planning(counts: list[int], accelerate_limit: int) -> list[dict[str, Any]]:
    """(d): planning time against the number of leaf modules."""
    import logging
    import warnings

    from accelerate.utils import infer_auto_device_map

    from distlib import infer_device_map

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    rows = []
    for count in counts:
        model = _leaf_model(count)
        total = sum(p.numel() * 4 for p in model.parameters())
        budget = {0: total // 3, 1: total // 3, "cpu": total // 6}
        row: dict[str, Any] = {"leaves": count}
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = infer_device_map(model, budget, ["Block"])
        row["distlib_s"] = time.perf_counter() - start
        if count <= accelerate_limit:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = infer_auto_device_map(model, dict(budget), ["Block"])
            row["accelerate_s"] = time.perf_counter() - start
            row["same_map"] = dict(theirs) == ours.as_dict()
        rows.append(row)
    return rows


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.7)
    parser.add_argument("--folder", default=None, help="reuse/write the checkpoint here")
    parser.add_argument("--cpu-budget", default="600MB", help="the cpu budget of case (c)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (fastest kept)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lib", default="distlib", help=argparse.SUPPRESS)
    parser.add_argument("--accelerate-plan-limit", type=int, default=10_000,
                        help="largest leaf count to time Accelerate's planner on")
    parser.add_argument("--quick", action="store_true", help="planning up to 10,000 leaves only")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.lib, args.size_gb, args.folder,
                                  args.cpu_budget)))
        return 0
    folder = args.folder or tempfile.mkdtemp(prefix="distlib-bench-")
    if not os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
        os.makedirs(folder, exist_ok=True)
        write_checkpoint(args.size_gb, folder)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"checkpoint: {folder} ({_mb(size)}, {_config(args.size_gb).num_hidden_layers} layers)")
    _subprocess("floor", "distlib", args.size_gb, folder)  # warm the page cache
    results = {case: {lib: _subprocess(case, lib, args.size_gb, folder, args.cpu_budget,
                                       args.repeat)
                      for lib in ("distlib", "accelerate")}
               for case in ("empty", "cpu", "offload")}
    floor = _subprocess("floor", "distlib", args.size_gb, folder, repeat=args.repeat)
    print(json.dumps({"floor": floor, **results}, indent=1))
    counts = [100, 1_000, 10_000] if args.quick else [100, 1_000, 10_000, 100_000]
    print(json.dumps(planning(counts, args.accelerate_plan_limit), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
