"""``distlib plan``: what a model needs before any process starts, from shapes only.

Two modes of one command: ``distlib plan CHECKPOINT`` plans the device map a checkpoint would
get, from its headers; ``distlib plan --mesh dp_shard=2,tp=2 --model-config CFG`` plans a
parallel mesh (`plan_parallelism`): each rank's bytes and the mesh's divisibility checks.

The planners are imported when the command runs (importing ``distlib.big_model`` or
``distlib.training`` imports torch), so ``distlib plan --help`` answers without torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from distlib.cli._args import spellings
from distlib.errors import ConfigError, DeviceMapError
from distlib.topology import parse_mesh

if TYPE_CHECKING:
    from distlib.training.plan import ParallelPlan

__all__ = ["add_arguments", "parse_max_memory", "plan_checkpoint", "plan_mesh", "run"]

# the options of each mode, to refuse one given to the other
_MAP_OPTIONS = {"max_memory": "--max-memory", "dtype": "--dtype", "no_split": "--no-split",
                "mode": "--mode"}
_MESH_OPTIONS = {"precision": "--precision", "optimizer": "--optimizer", "seq_len": "--seq-len",
                 "num_processes": "--num-processes", "tp_plan": "--tp-plan"}
# --optimizer's choices: the keys of distlib.training.plan.OPTIMIZERS (a unit test holds them
# equal), named here so that --help needs no torch
OPTIMIZER_NAMES = ("adamw", "adam", "sgd", "sgd_momentum")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's options."""
    parser.add_argument("checkpoint", nargs="?", default=None, metavar="CHECKPOINT",
                        help="a .safetensors/.bin file, an index .json or a folder (device-map "
                             "mode; not with --mesh)")
    parser.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                        help="plan a parallel mesh instead, such as 'dp_shard=2,tp=2' (axes "
                             "dp_replicate, dp_shard, cp, tp); needs --model-config")
    parser.add_argument("--precision", default=None, choices=("no", "fp16", "bf16", "fp8"),
                        help="with --mesh: the compute precision (default no)")
    parser.add_argument("--optimizer", default=None, choices=OPTIMIZER_NAMES,
                        help="with --mesh: whose states to count (default adamw)")
    parser.add_argument(*spellings("--seq-len"), type=int, default=None, metavar="N",
                        help="with --mesh: the sequence length, checked against cp (default: "
                             "not checked)")
    parser.add_argument(*spellings("--num-processes"), type=int, default=None, metavar="N",
                        help="with --mesh: the world size (needed when a size is -1; default: "
                             "the mesh's product)")
    parser.add_argument(*spellings("--tp-plan"), default=None, metavar="JSON",
                        help="with --mesh: {module pattern: style} (default: the model's own)")
    parser.add_argument(*spellings("--max-memory"), default=None, metavar="DEVICE=SIZE,...",
                        help="budgets such as 'cuda:0=20GiB,cuda:1=20GiB,cpu=30GiB' "
                             "(default: this machine's free memory)")
    parser.add_argument("--dtype", default=None, metavar="NAME",
                        help="dtype the weights will be loaded in, such as bf16, fp16 or "
                             "float32 (default: each tensor's own)")
    parser.add_argument(*spellings("--no-split"), nargs="+", default=None, metavar="CLASS",
                        help="classes to keep whole; without --model-config, name patterns "
                             "such as 'model.layers.*'")
    parser.add_argument(*spellings("--model-config"), default=None, metavar="PATH",
                        help="a transformers config (file or folder) to build the empty model "
                             "for class names, no-split defaults and ties")
    parser.add_argument("--mode", default=None,
                        choices=("sequential", "auto", "balanced", "balanced_low_0"),
                        help="how to spread the device map (default sequential)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


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

    from distlib.big_model.empty import init_empty_weights

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
    from distlib.big_model.device_map import infer_device_map
    from distlib.big_model.files import CheckpointReader, checkpoint_files
    from distlib.big_model.sizes import layout_from_tensors

    if model_config is not None:
        model: Any = _empty_model(model_config)
        if no_split is None:
            no_split = list(getattr(model, "_no_split_modules", None) or ())
    else:
        # the shards in their numbered order (an index lists its tensors sorted as text)
        files = sorted(checkpoint_files(checkpoint), key=lambda f: _numbered(os.path.basename(f)))
        model = layout_from_tensors(_model_order(CheckpointReader(files).infos().values()))
    return infer_device_map(model, max_memory, no_split or (), dtype, mode=mode,
                            keep_in_fp32_modules=None if model_config else ())


def _numbered(name: str) -> list[tuple[int, int | str]]:
    """Sort key: the numbers in a name as numbers (``model-2-of-10`` before ``model-10-of-10``)."""
    return [(0, int(part)) if part.isdigit() else (1, part)
            for part in re.split(r"(\d+)", name) if part]


def _model_order(infos: Iterable[Any]) -> list[Any]:
    """The tensors in the checkpoint's own module order: each module where it first appears
    in the files (the shards in their numbered order, each file's tensors by offset), except
    that numbered siblings (the entries of a ``ModuleList`` or ``Sequential``) keep their
    numbers' order, which is their order in the model (``layers.2`` before ``layers.10``, as a
    file that sorts names as text does not). Nothing else is reordered.

    Example:
        >>> from distlib.big_model.sizes import TensorInfo
        >>> names = ["wte.w", "h.10.w", "h.2.w", "h.2.b", "ln_f.w", "h.0.w", "lm_head.w"]
        >>> [i.name for i in _model_order(TensorInfo(name=n, numel=1, dtype="float32")
        ...                                for n in names)]
        ['wte.w', 'h.0.w', 'h.2.w', 'h.2.b', 'h.10.w', 'ln_f.w', 'lm_head.w']
    """
    infos = list(infos)
    children: dict[tuple[str, ...], dict[str, None]] = {}
    for info in infos:
        parts = tuple(info.name.split("."))
        for depth in range(len(parts)):
            children.setdefault(parts[:depth], {})[parts[depth]] = None
    place: dict[tuple[str, ...], int] = {}
    for parent, seen in children.items():
        names = list(seen)
        slots = [i for i, name in enumerate(names) if name.isdigit()]
        for i, name in zip(slots, sorted((names[i] for i in slots), key=int), strict=True):
            names[i] = name
        place.update({(*parent, name): i for i, name in enumerate(names)})

    def key(info: Any) -> list[int]:
        parts = tuple(info.name.split("."))
        return [place[parts[:depth + 1]] for depth in range(len(parts))]

    return sorted(infos, key=key)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = (),
           indent: str = "", minimum: Sequence[int] = ()) -> list[str]:
    """Columns that line up: each as wide as its widest cell (or ``minimum``), two spaces
    apart; the columns in ``right`` aligned right (numbers)."""
    least = list(minimum) + [0] * (len(header) - len(minimum))
    widths = [max(least[i], *(len(row[i]) for row in [header, *rows]))
              for i in range(len(header))]
    return [(indent + "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                                for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             ).rstrip() for row in [header, *rows]]


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size} B"


def _refuse(args: argparse.Namespace, options: dict[str, str], why: str) -> None:
    given = [flag for dest, flag in options.items() if getattr(args, dest) is not None]
    if given:
        msg = f"{', '.join(given)} must not be given {why}, but got {', '.join(given)}."
        raise ConfigError(msg)


def _read_config(path: str) -> dict[str, Any]:
    import pathlib

    file = pathlib.Path(path)
    file = file / "config.json" if file.is_dir() else file
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        msg = (f"--model-config must be a transformers config.json (or its folder), but "
               f"reading {str(file)!r} failed: {error}.")
        raise ConfigError(msg) from error
    if not isinstance(config, dict):
        msg = f"--model-config must hold a JSON object, but got {type(config).__name__}."
        raise ConfigError(msg)
    return config


def plan_mesh(model_config: str, mesh: str, *, precision: str = "no", optimizer: str = "adamw",
              seq_len: int | None = None, num_processes: int | None = None,
              tp_plan: str | None = None) -> ParallelPlan:
    """Plan ``mesh`` for the model a transformers config describes (no weights, no GPU).

    Layouts the planner counts (`CONFIG_MODEL_TYPES`) are read from the JSON alone; any other
    is built empty through transformers and planned from its parameters' shapes.
    """
    from distlib.training.plan import CONFIG_MODEL_TYPES, plan_parallelism

    config = _read_config(model_config)
    plan: Any = "auto"
    if tp_plan is not None:
        try:
            plan = json.loads(tp_plan)
        except ValueError as error:
            msg = (f"--tp-plan must be a JSON object {{module pattern: style}}, but got "
                   f"{tp_plan!r}: {error}.")
            raise ConfigError(msg) from error
    model: Any = config
    if config.get("model_type", "llama") not in CONFIG_MODEL_TYPES:
        model = _empty_model(model_config)
    return plan_parallelism(model, parse_mesh(mesh), precision=precision, optimizer=optimizer,
                            tp_plan=plan, seq_len=seq_len, world_size=num_processes)


def _print_mesh_plan(plan: ParallelPlan, as_json: bool) -> None:
    rows = (("parameters", plan.param_bytes), ("gradients", plan.grad_bytes),
            ("optimizer", plan.optimizer_bytes), ("total", plan.rank_bytes))
    if as_json:
        print(json.dumps({"mesh": plan.mesh.sizes, "world_size": plan.mesh.world_size,
                          "precision": plan.precision.value, "optimizer": plan.optimizer,
                          "num_parameters": plan.num_parameters,
                          "total_param_bytes": plan.total_param_bytes,
                          "per_rank_bytes": dict(rows), "shard_factors": dict(plan.shard_factors),
                          "checks": list(plan.checks), "unchecked": list(plan.unchecked)},
                         indent=2))
        return
    print(f"mesh: {plan.mesh} ({plan.mesh.world_size} ranks)   precision: {plan.precision.value} "
          f"(master weights and gradients keep the parameters' dtype)   optimizer: "
          f"{plan.optimizer}")
    print(f"model: {plan.num_parameters:,} parameters, {_human(plan.total_param_bytes)} unsharded")
    print()
    print("\n".join(_table(("per rank", "bytes", "size"),
                           [(name, f"{size:,}", _human(size)) for name, size in rows],
                           right=(1, 2), indent="  ", minimum=(10, 13))))
    factors = ", ".join(f"{axis} {factor:.3g}" for axis, factor in plan.shard_factors)
    print(f"\nshard factors: {factors}\nchecks:")
    for check in plan.checks:
        print(f"  ok  {check}")
    for check in plan.unchecked:
        print(f"  --  {check}")


def run(args: argparse.Namespace) -> int:
    """Plan and print: the mesh's per-rank bytes and checks, or the checkpoint's device map."""
    if args.mesh is not None:
        _refuse(args, _MAP_OPTIONS, "with --mesh (they plan a device map)")
        if args.checkpoint is not None or args.model_config is None:
            msg = ("distlib plan --mesh must be given --model-config CFG and no CHECKPOINT, but "
                   f"got CHECKPOINT={args.checkpoint!r}, --model-config={args.model_config!r}. "
                   "Plan a mesh from the model's config.json.")
            raise ConfigError(msg)
        _print_mesh_plan(plan_mesh(args.model_config, args.mesh,
                                   precision=args.precision or "no",
                                   optimizer=args.optimizer or "adamw", seq_len=args.seq_len,
                                   num_processes=args.num_processes, tp_plan=args.tp_plan),
                         args.json)
        return 0
    _refuse(args, _MESH_OPTIONS, "without --mesh (they plan a mesh)")
    if args.checkpoint is None:
        msg = ("distlib plan: the command must be given a CHECKPOINT (a device map) or --mesh "
               "(a parallel plan), but got neither. Try 'distlib plan --mesh dp_shard=2,tp=2 "
               "--model-config config.json'.")
        raise ConfigError(msg)
    max_memory = parse_max_memory(args.max_memory) if args.max_memory else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_checkpoint(args.checkpoint, max_memory, args.dtype, args.no_split,
                               args.model_config, args.mode or "sequential")
    if args.json:
        print(json.dumps({"device_map": plan.as_dict(),
                          "usage": {str(d): b for d, b in plan.usage}}, indent=2))
        return 0
    print("\n".join(_table(("module", "device"), [(name or "(whole model)", str(device))
                                                 for name, device in plan.entries])))
    print("\nper device:")
    print("\n".join(_table(("device", "bytes", "size"),
                           [(str(d), f"{b:,}", _human(b)) for d, b in plan.usage],
                           right=(1, 2), indent="  ")))
    for warning in caught:
        print(f"\nwarning: {warning.message}")
    return 0
