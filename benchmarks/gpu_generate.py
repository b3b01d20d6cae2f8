"""Time per generated token for a model split over GPU + CPU + disk: distlib vs Accelerate.

    python benchmarks/gpu_generate.py             # on a GPU machine (builds the checkpoint)
    python benchmarks/gpu_generate.py --dry-run   # a tiny model on the CPU (the test suite)

A Llama-style model (about 1 GB in bf16) is mapped a third of its layers each to cuda:0, the
CPU and the disk (embeddings, norm and head on the GPU), loaded with each library's
``load_checkpoint_and_dispatch`` and the same map, and asked for greedy tokens. Time per token
is ``(t(N tokens) - t(1 token)) / (N - 1)``, best of two; distlib reads ahead (its default).
Both must give the tokens of the whole model on the GPU.
"""

from __future__ import annotations

import gc
import tempfile
from typing import Any

import torch
from _gpu_common import config_for_bytes, device_or_skip, emit, parser, sync, write_checkpoint

NAME = "gpu_generate"


def _map(config: Any, gpu: Any) -> dict[str, Any]:
    n = config.num_hidden_layers
    third = max(1, n // 3)
    plan: dict[str, Any] = {"model.embed_tokens": gpu, "model.rotary_emb": gpu,
                            "model.norm": gpu, "lm_head": gpu}
    for i in range(n):
        plan[f"model.layers.{i}"] = gpu if i < third else ("cpu" if i < 2 * third else "disk")
    return plan


def _empty(config: Any, lib: str) -> Any:
    import transformers

    if lib == "accelerate":
        from accelerate import init_empty_weights
    else:
        from distlib import init_empty_weights
    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config).eval()


def _per_token(model: Any, ids: torch.Tensor, new: int, device: str) -> tuple[float, list[int]]:
    import time

    kwargs = {"do_sample": False, "pad_token_id": 0}
    best1 = bestn = float("inf")
    tokens: list[int] = []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, **kwargs)  # warm-up (and the learnt order)
        for _ in range(2):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, **kwargs)
            sync(device)
            best1 = min(best1, time.perf_counter() - start)
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
            sync(device)
            bestn = min(bestn, time.perf_counter() - start)
            tokens = out[0, ids.shape[1]:].tolist()
    return (bestn - best1) / (new - 1), tokens


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    device = device_or_skip(args, NAME)
    if device is None:
        return 0
    import distlib as dl

    config = config_for_bytes(5e5 if args.dry_run else args.size_gb * 1e9,
                              hidden=64 if args.dry_run else 2048,
                              vocab=256 if args.dry_run else 32000)
    config.num_hidden_layers = max(config.num_hidden_layers, 3)
    folder = args.folder or tempfile.mkdtemp(prefix="distlib-gpu-gen-")
    built = write_checkpoint(config, folder, torch.bfloat16, device)
    gpu: Any = 0 if device.startswith("cuda") else "cpu"
    ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    new = 4 if args.dry_run else args.new_tokens

    whole = dl.load_checkpoint_and_dispatch(_empty(config, "distlib"), folder, {"": gpu},
                                            quiet=True)
    with torch.no_grad():
        want = whole.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=0)[0, ids.shape[1]:].tolist()
    resident_s, _ = _per_token(whole, ids, new, device)
    del whole
    gc.collect()

    plan = _map(config, gpu)
    ours = dl.load_checkpoint_and_dispatch(_empty(config, "distlib"), folder, plan,
                                           offload_folder=tempfile.mkdtemp(), quiet=True)
    ours_s, ours_tokens = _per_token(ours, ids, new, device)
    del ours
    gc.collect()

    from accelerate import load_checkpoint_and_dispatch

    theirs = load_checkpoint_and_dispatch(_empty(config, "accelerate"), folder, device_map=plan,
                                          offload_folder=tempfile.mkdtemp())
    theirs_s, theirs_tokens = _per_token(theirs, ids, new, device)
    result = {
        "benchmark": NAME, "device": torch.cuda.get_device_name(0) if device != "cpu" else "cpu",
        "dry_run": args.dry_run, "checkpoint_bytes": built["bytes"],
        "layers": {"gpu": sum(v == gpu for k, v in plan.items() if ".layers." in k),
                   "cpu": sum(v == "cpu" for k, v in plan.items() if ".layers." in k)
                   if gpu != "cpu" else 0,
                   "disk": sum(v == "disk" for v in plan.values())},
        "ms_per_token": {"resident": round(resident_s * 1e3, 2), "distlib": round(ours_s * 1e3, 2),
                         "accelerate": round(theirs_s * 1e3, 2)},
        "ratio_distlib_to_accelerate": round(ours_s / theirs_s, 3) if theirs_s > 0 else None,
        "tokens_equal_whole_model": {"distlib": ours_tokens == want,
                                     "accelerate": theirs_tokens == want},
    }
    emit(args, result)
    return 0 if ours_tokens == want else 1


if __name__ == "__main__":
    raise SystemExit(main())
