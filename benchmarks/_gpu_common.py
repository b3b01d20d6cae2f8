"""What the GPU benchmarks share: a Llama-style checkpoint of a given size, timing, JSON out.

Each GPU benchmark takes ``--json PATH`` (write its result there), ``--dry-run`` (a tiny model
on the CPU through the same code, so the scripts cannot rot between GPU visits; run by the test
suite) and prints ``no CUDA: skipped`` and exits 0 when neither CUDA nor ``--dry-run`` is there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    p.add_argument("--json", default=None, help="write the result as JSON to this path")
    p.add_argument("--dry-run", action="store_true",
                   help="a tiny model on the CPU through the same code (no numbers kept)")
    p.add_argument("--folder", default=None, help="where to build the checkpoint (default: tmp)")
    return p


def device_or_skip(args: argparse.Namespace, name: str) -> str | None:
    """``"cuda:0"``; ``"cpu"`` for a dry run; None (after saying so) without CUDA."""
    if args.dry_run:
        return "cpu"
    if not torch.cuda.is_available():
        print(f"{name}: no CUDA: skipped")
        emit(args, {"benchmark": name, "skipped": "no CUDA"})
        return None
    return "cuda:0"


def llama_config(hidden: int, layers: int, vocab: int = 32000) -> Any:
    import transformers

    heads = max(1, hidden // 128)
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                                    num_attention_heads=heads, num_key_value_heads=heads,
                                    num_hidden_layers=layers, vocab_size=vocab,
                                    tie_word_embeddings=False)


def config_for_bytes(total_bytes: float, hidden: int, dtype_bytes: int = 2,
                     vocab: int = 32000) -> Any:
    """A Llama config whose weights take about ``total_bytes`` in a ``dtype_bytes`` dtype."""
    inter = int(hidden * 2.6875)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((total_bytes / dtype_bytes - fixed) / per_layer))
    return llama_config(hidden, layers, vocab)


def write_checkpoint(config: Any, folder: str, dtype: torch.dtype, device: str,
                     shard_bytes: int = 1 << 30, seed: int = 0) -> dict[str, Any]:
    """Random weights of ``config``'s causal LM, saved as sharded safetensors with an index.

    The tensors are drawn on ``device`` (fast on a GPU) and written shard by shard, so the
    host never holds more than one shard. Returns ``{"bytes", "files", "seconds"}``.
    """
    import transformers
    from safetensors.torch import save_file

    from distlib import init_empty_weights

    start = time.perf_counter()
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map: dict[str, str] = {}
    total = 0
    files: list[str] = []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], os.path.join(folder, name), metadata={"format": "pt"})
        files.append(name)
        for key in shards[-1]:
            weight_map[key] = name
        shards.append({})

    for key, param in model.state_dict().items():
        value = torch.empty(param.shape, dtype=dtype, device=device)
        if value.dim() > 1:
            value.normal_(0.0, 0.02, generator=gen)
        else:
            value.fill_(1.0)
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush()
            size = 0
        shards[-1][key] = value.cpu()
        size += nbytes
        total += nbytes
    if shards[-1]:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
        json.dump(index, handle)
    config.save_pretrained(folder)
    return {"bytes": total, "files": len(files), "seconds": time.perf_counter() - start}


def best_of(runs: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """The fastest of ``runs`` calls of ``fn`` (seconds, and the last value)."""
    best, value = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def emit(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Print ``result`` as JSON and write it to ``--json`` when given."""
    text = json.dumps(result, indent=2, sort_keys=True, default=str)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    sys.stdout.flush()
