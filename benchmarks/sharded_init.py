"""Sharded init from a safetensors checkpoint: load time and peak RSS per rank, 2 CPU ranks.

Three ways to get a transformers Llama (about --mb MB of fp32 weights, one safetensors file)
into FSDP2 shards over 2 gloo ranks, each in its own launch (so each peak is its own):

- distlib: ``init_empty_weights`` -> ``dl.wrap`` (FSDP2) -> ``dl.load_checkpoint``: each rank
  reads only its slices;
- full then wrap: every rank ``LlamaForCausalLM.from_pretrained`` (the whole model) -> wrap;
- Accelerate: ``from_pretrained`` under ``ACCELERATE_USE_FSDP=1`` and
  ``FSDP_CPU_RAM_EFFICIENT_LOADING=1`` (rank 0 loads, the others build on meta), then
  ``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2,
  cpu_ram_efficient_loading=True, sync_module_states=True)).prepare(model)``. Where that
  path does not run on CPU, its row says the error it gave.

Each rank resets its peak RSS (Linux ``clear_refs``) after its imports, so "peak growth" is
what building and loading the model cost that rank. Times are wall seconds from the model's
construction to a loaded, sharded model (the slower rank).

Run: python benchmarks/sharded_init.py [--mb 320]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import tempfile
import time
from typing import Any

import distlib as dl
from distlib.errors import LaunchError

MIB = 2**20


def _config(mb: int) -> Any:
    from transformers import LlamaConfig

    layers = max(1, round((mb * MIB / 4 - 2 * 8000 * 1024) / 12.85e6))
    return LlamaConfig(vocab_size=8000, hidden_size=1024, intermediate_size=2816,
                       num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                       tie_word_embeddings=False)


def _write(folder: pathlib.Path, mb: int) -> int:
    """A transformers checkpoint folder (config.json + model.safetensors); its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = _config(mb)
    config.save_pretrained(folder)
    with dl.init_empty_weights():
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in weights.values())


def _status(field: str) -> int:
    text = pathlib.Path("/proc/self/status").read_text()
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) * 1024 if found else 0


def _measured(run: Any) -> dict[str, Any]:
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    share = run()
    return {"seconds": time.perf_counter() - start, "peak_growth": _status("VmHWM") - before,
            "share": share}


def _share(model: Any) -> int:
    return sum(p.to_local().numel() * p.element_size() for p in model.parameters())


def _distlib(env: dl.Env, folder: str) -> dict[str, Any]:
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(folder)

    def run() -> int:
        with dl.init_empty_weights():
            model = LlamaForCausalLM(config)
        model = dl.wrap(model, dl.FSDP(), env=env)
        dl.load_checkpoint(model, folder)
        return _share(model)
    return _measured(run)


def _full_then_wrap(env: dl.Env, folder: str) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    def run() -> int:
        model = LlamaForCausalLM.from_pretrained(folder)
        model = dl.wrap(model, dl.FSDP(), env=env)
        return _share(model)
    return _measured(run)


def _accelerate(folder: str) -> dict[str, Any]:
    """Accelerate's path in a rank started without distlib's group (Accelerate makes it)."""
    state: dict[str, Any] = {}

    def run() -> int:
        from accelerate import Accelerator, FullyShardedDataParallelPlugin
        from transformers import LlamaForCausalLM

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=True,
                                                sync_module_states=True)
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
        model = accelerator.prepare(LlamaForCausalLM.from_pretrained(folder))
        first = next(model.parameters())
        state["sharded"] = hasattr(first, "to_local")
        state["why"] = (f"distributed_type={accelerator.state.distributed_type.value}, "
                        f"parameters on {first.device}")
        return _share(model) if state["sharded"] else 0
    try:
        out = _measured(run)
    except Exception as exc:  # reported as the row: does this path run on CPU?
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    if not state["sharded"]:
        out["error"] = ("prepare() did not shard: Accelerate applies FSDP only on GPU-like "
                        f"distributed types ({state['why']})")
    return out


def _row(name: str, ranks: dict[int, dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": name}
    errors = {r: v["error"] for r, v in ranks.items() if "error" in v}
    if errors:
        row["error"] = errors
    if all("seconds" in v for v in ranks.values()):
        row.update({"seconds": round(max(v["seconds"] for v in ranks.values()), 3),
                    "peak_growth_mib": [round(ranks[r]["peak_growth"] / MIB) for r in sorted(ranks)],
                    "share_mib": [round(ranks[r]["share"] / MIB) for r in sorted(ranks)]})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=320)
    args = parser.parse_args()
    from distlib.testing import spawn

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        total = _write(folder, args.mb)
        rows = [_row("distlib sharded load", spawn(_distlib, str(folder), timeout_s=600).returns),
                _row("full load per rank, then wrap",
                     spawn(_full_then_wrap, str(folder), timeout_s=600).returns)]
        environ = {**os.environ, "ACCELERATE_USE_FSDP": "1",
                   "FSDP_CPU_RAM_EFFICIENT_LOADING": "1"}
        try:
            accel = spawn(_accelerate, str(folder), join_group=False, environ=environ,
                          timeout_s=600).returns
            rows.append(_row("Accelerate cpu_ram_efficient_loading", accel))
        except LaunchError as exc:
            rows.append({"variant": "Accelerate cpu_ram_efficient_loading",
                         "error": str(exc).splitlines()[-1][:300]})
    print(json.dumps({"checkpoint_mib": round(total / MIB), "ranks": 2, "rows": rows}, indent=1))
    base = rows[0]
    for row in rows[1:]:
        if "error" not in row and "error" not in base:
            print(f"{row['variant']}: {row['seconds'] / base['seconds']:.2f}x distlib's time, "
                  f"{max(row['peak_growth_mib']) / max(1, max(base['peak_growth_mib'])):.2f}x "
                  "its peak RSS growth")


if __name__ == "__main__":
    main()
