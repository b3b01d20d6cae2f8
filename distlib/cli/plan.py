"""``distlib plan CHECKPOINT``: the device map a checkpoint would get, from its headers only."""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any

from distlib.big_model.device_map import infer_device_map
from distlib.big_model.empty import init_empty_weights
from distlib.big_model.files import checkpoint_tensors
from distlib.big_model.sizes import layout_from_tensors
from distlib.cli._args import spellings
from distlib.errors import DeviceMapError

__all__ = ["add_arguments", "parse_max_memory", "plan_checkpoint", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's options."""
    parser.add_argument("checkpoint", help="a .safetensors/.bin file, an index .json or a folder")
    parser.add_argument(*spellings("--max-memory"), default=None,
                        help="budgets such as 'cuda:0=20GiB,cuda:1=20GiB,cpu=30GiB' "
                             "(default: this machine's free memory)")
    parser.add_argument("--dtype", default=None, help="dtype the weights will be loaded in (bf16)")
    parser.add_argument(*spellings("--no-split"), nargs="+", default=None, metavar="CLASS",
                        help="classes to keep whole; without --model-config, name patterns "
                             "such as 'model.layers.*'")
    parser.add_argument(*spellings("--model-config"), default=None,
                        help="a transformers config (file or folder) to build the empty model "
                             "for class names, no-split defaults and ties")
    parser.add_argument("--mode", default="sequential",
                        choices=("sequential", "auto", "balanced", "balanced_low_0"))
    parser.add_argument("--json", action="store_true", help="print the map as JSON")


def parse_max_memory(text: str) -> dict[str, str]:
    """Parse ``"cuda:0=20GiB,cpu=30GiB"`` into ``{"cuda:0": "20GiB", "cpu": "30GiB"}``.

    Examples:
        >>> parse_max_memory("0=1GB, cpu=2GiB")
        {'0': '1GB', 'cpu': '2GiB'}
    """
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        device, sep, size = item.partition("=")
        if not sep or not device.strip() or not size.strip():
            msg = (f"distlib plan: --max-memory must look like 'cuda:0=20GiB,cpu=30GiB', but got "
                   f"{text!r}.")
            raise DeviceMapError(msg)
        out[device.strip()] = size.strip()
    return out


def _empty_model(config_path: str) -> Any:
    import transformers  # optional: only with --model-config

    config = transformers.AutoConfig.from_pretrained(config_path)
    with init_empty_weights():
        try:
            return transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        except ValueError:
            return transformers.AutoModel.from_config(config)  # type: ignore[no-untyped-call]


def plan_checkpoint(checkpoint: str, max_memory: dict[str, Any] | None = None, dtype: Any = None,
                    no_split: list[str] | None = None, model_config: str | None = None,
                    mode: str = "sequential") -> Any:
    """Return the `DeviceMap` for a checkpoint, reading headers (or a config) only."""
    if model_config is not None:
        model: Any = _empty_model(model_config)
        if no_split is None:
            no_split = list(getattr(model, "_no_split_modules", None) or ())
    else:
        infos = checkpoint_tensors(checkpoint)
        model = layout_from_tensors(_model_order(infos.values()))
    return infer_device_map(model, max_memory, no_split or (), dtype, mode=mode,
                            keep_in_fp32_modules=None if model_config else ())


def _natural(name: str) -> list[tuple[int, int | str]]:
    """Sort key: numbered blocks in numeric order (``layers.2`` before ``layers.10``)."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def _model_order(infos: Any) -> list[Any]:
    """Guess the definition order from names alone: the backbone (the top-level module with
    the most tensors) first, then the smaller ones such as heads; numbers as numbers."""
    counts: dict[str, int] = {}
    for info in infos:
        top = info.name.split(".")[0]
        counts[top] = counts.get(top, 0) + 1
    return sorted(infos, key=lambda i: (-counts[i.name.split(".")[0]], _natural(i.name)))


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size} B"


def run(args: argparse.Namespace) -> int:
    """Plan and print the map: each block's device, then each device's total."""
    max_memory = parse_max_memory(args.max_memory) if args.max_memory else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_checkpoint(args.checkpoint, max_memory, args.dtype, args.no_split,
                               args.model_config, args.mode)
    if args.json:
        print(json.dumps({"device_map": plan.as_dict(),
                          "usage": {str(d): b for d, b in plan.usage}}, indent=2))
        return 0
    width = max((len(n) for n, _ in plan.entries), default=4)
    print(f"{'module':<{width}}  device")
    for name, device in plan.entries:
        print(f"{name or '(whole model)':<{width}}  {device}")
    print("\nper device:")
    for device, size in plan.usage:
        print(f"  {device!s:<6} {_human(size)}")
    for warning in caught:
        print(f"\nwarning: {warning.message}")
    return 0
