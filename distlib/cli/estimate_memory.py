"""``distlib estimate-memory``: the memory a model needs to train, per dtype and per strategy.

What ``accelerate estimate-memory`` prints (the largest layer, the total size, training with
Adam), from shapes only, plus what one rank holds under each strategy (DDP, ZeRO stages 1-3,
FSDP) for a number of processes or an N-D mesh. The bytes come from the planner `wrap` and
``distlib plan --mesh`` use (`plan_rank_memory` over `plan_parallelism`), the sizes and the
largest layer from the device-map planner's (``module_sizes``), so an estimate cannot disagree
with what those compute.

The model comes from a transformers config (a ``config.json`` or its folder; built empty
through transformers), a checkpoint's headers (a ``.safetensors`` file, an index or a folder)
or, from Python, an ``nn.Module`` built under `init_empty_weights`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distlib.cli._args import spellings
from distlib.cli.plan import OPTIMIZER_NAMES, _empty_model, _human, _model_order, _numbered, _table
from distlib.errors import CheckpointError, ConfigError
from distlib.topology import Mesh, parse_mesh

if TYPE_CHECKING:  # the planners import torch: imported where they run, so --help needs none
    from distlib.big_model.sizes import Layout
    from distlib.training.plan import RankMemory

__all__ = ["DTYPES", "DtypeEstimate", "MemoryEstimate", "add_arguments", "estimate_memory",
           "run"]

# row -> (dtype the weights are held in, dtype a layer computes in, distlib precision).
# The "-mixed" rows are distlib's precision="bf16"/"fp16": fp32 masters, half compute (FSDP2
# gathers each layer in half); the plain half rows are a model cast to half, its gradients
# and optimizer states with it (as torch.optim keeps them).
DTYPES: dict[str, tuple[str, str, str]] = {
    "float32": ("float32", "float32", "no"),
    "float16": ("float16", "float16", "no"),
    "bfloat16": ("bfloat16", "bfloat16", "no"),
    "bf16-mixed": ("float32", "bfloat16", "bf16"),
    "fp16-mixed": ("float32", "float16", "fp16"),
}
_DEFAULT_DTYPES = ("float32", "float16", "bfloat16", "bf16-mixed")
_CALL = "distlib estimate-memory"


@dataclass(frozen=True, slots=True, kw_only=True)
class DtypeEstimate:
    """One dtype's row: the sizes Accelerate reports and each strategy's per-rank bytes.

    Attributes:
        dtype: one of `DTYPES`.
        largest_layer_bytes: the largest layer in the compute dtype (what FSDP gathers at once,
            what a device map keeps room for).
        largest_layer: the names of the layers of that size.
        total_bytes: parameters and buffers in the dtype the weights are held in.
        training_bytes: one process training alone (weights, gradients, optimizer states).
        strategies: per-rank bytes, one `RankMemory` per strategy.
    """

    dtype: str
    largest_layer_bytes: int
    largest_layer: tuple[str, ...]
    total_bytes: int
    training_bytes: int
    strategies: tuple[RankMemory, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryEstimate:
    """What `estimate_memory` returns: the mesh, the optimizer, one row per dtype.

    Attributes:
        mesh: the resolved mesh (its data-parallel ranks are what the strategies split over).
        optimizer: one of `OPTIMIZERS`.
        num_parameters: parameters of the model (tied ones once).
        rows: one `DtypeEstimate` per dtype asked.
    """

    mesh: Mesh
    optimizer: str
    num_parameters: int
    rows: tuple[DtypeEstimate, ...]

    def as_dict(self) -> dict[str, Any]:
        """The estimate as JSON-ready values (what ``--json`` prints)."""
        return {"mesh": self.mesh.sizes, "world_size": self.mesh.world_size,
                "optimizer": self.optimizer, "num_parameters": self.num_parameters,
                "dtypes": [{"dtype": r.dtype, "largest_layer_bytes": r.largest_layer_bytes,
                            "largest_layer": list(r.largest_layer),
                            "total_bytes": r.total_bytes, "training_bytes": r.training_bytes,
                            "per_rank": {m.strategy: {"parameters": m.param_bytes,
                                                      "gradients": m.grad_bytes,
                                                      "optimizer": m.optimizer_bytes,
                                                      "total": m.total_bytes}
                                         for m in r.strategies}}
                           for r in self.rows]}


@dataclass(frozen=True, slots=True)
class _Source:
    layout: Layout
    no_split: tuple[str, ...]
    planned: Any  # what plan_parallelism takes: a module, or (name, shape, itemsize) triples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's options."""
    parser.add_argument("source", metavar="PATH",
                        help="a transformers config.json (or its folder), or a checkpoint: a "
                             ".safetensors file, an index .json or a folder of shards")
    parser.add_argument(*spellings("--num-processes"), type=int, default=None, metavar="N",
                        help="the ranks the strategies split over (default: the mesh's "
                             "product, else 1)")
    parser.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                        help="an N-D mesh such as 'dp_shard=4,tp=2' (axes dp_replicate, "
                             "dp_shard, cp, tp)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=tuple(DTYPES),
                        metavar="DTYPE",
                        help=f"the rows, of {', '.join(DTYPES)} (default: "
                             f"{' '.join(_DEFAULT_DTYPES)})")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZER_NAMES,
                        help="whose states to count (default adamw)")
    parser.add_argument(*spellings("--tp-plan"), default=None, metavar="JSON",
                        help="{module pattern: style} when tp > 1 (default: the model's own)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        msg = (f"{_CALL}: PATH must be a transformers config.json or a checkpoint, but reading "
               f"{path!r} failed: {error}. Give a readable JSON file.")
        raise ConfigError(msg) from error


def _is_config(path: str) -> str | None:
    """The config.json ``path`` names, or None when it names a checkpoint."""
    if os.path.isdir(path):
        candidate = os.path.join(path, "config.json")
        return candidate if os.path.isfile(candidate) else None
    if path.endswith(".json") and os.path.isfile(path):
        data = _read_json(path)
        return None if isinstance(data, dict) and "weight_map" in data else path
    return None


def _config_source(path: str) -> _Source:
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        got = (f"model_type={data.get('model_type')!r}" if isinstance(data, dict)
               else type(data).__name__)
        msg = (f"{_CALL}: a config must be a JSON object with a model_type (as transformers "
               f"writes config.json), but got {got} in {path!r}. Save the config with "
               "config.save_pretrained(folder).")
        raise ConfigError(msg)
    try:
        import transformers  # optional: only for a config
    except ImportError as error:
        msg = (f"{_CALL}: a config needs transformers to build the empty model, but got "
               f"{error}. pip install transformers, or give a checkpoint's headers.")
        raise ConfigError(msg) from error
    try:
        config_class = transformers.AutoConfig.for_model(data["model_type"]).__class__
    except (ValueError, KeyError) as error:
        msg = (f"{_CALL}: model_type must be one transformers knows, but got "
               f"{data['model_type']!r} in {path!r}. Check the config's model_type.")
        raise ConfigError(msg) from error
    alias = getattr(config_class, "attribute_map", {}).get("hidden_size", "hidden_size")
    if "hidden_size" not in data and alias not in data:
        also = f" (or {alias})" if alias != "hidden_size" else ""
        msg = (f"{_CALL}: a config must give hidden_size{also}, but got none in "
               f"{path!r} (transformers would fill in a default, not your model's). Add the "
               "model's hidden_size to the config.")
        raise ConfigError(msg)
    try:
        model = _empty_model(os.path.dirname(path) if path.endswith("config.json") else path)
    except (ValueError, OSError, TypeError) as error:
        msg = (f"{_CALL}: the config must build a transformers model, but building "
               f"{path!r} failed: {error}. Check the config's sizes.")
        raise ConfigError(msg) from error
    return _module_source(model)


def _module_source(model: Any) -> _Source:
    from distlib.big_model.sizes import layout_of

    no_split = tuple(getattr(model, "_no_split_modules", None) or ())
    return _Source(layout_of(model), no_split, model)


def _checkpoint_source(path: str) -> _Source:
    from distlib.big_model.files import CheckpointReader, checkpoint_files
    from distlib.big_model.sizes import dtype_size, layout_from_tensors

    try:
        found = checkpoint_files(path)
    except CheckpointError as error:
        msg = (f"{_CALL}: PATH must be a config.json, a folder holding one, or a checkpoint "
               f"(.safetensors/.bin file, index .json or a folder of them), but got {path!r}, "
               "which is none of these. Point at the model's folder or its config.json.")
        raise ConfigError(msg) from error
    files = sorted(found, key=lambda f: _numbered(os.path.basename(f)))
    infos = _model_order(CheckpointReader(files).infos().values())
    layout = layout_from_tensors(infos)
    # from headers a class is a name pattern: each numbered block (layers.*) is one layer
    no_split = tuple(sorted({m.class_name for m in layout.modules
                             if m.class_name.endswith(".*")}))
    triples = [(t.name, tuple(t.shape), dtype_size(t.dtype)) for t in infos]
    return _Source(layout, no_split, triples)


def _source_of(model_or_source: Any) -> _Source:
    if hasattr(model_or_source, "named_parameters"):
        return _module_source(model_or_source)
    if isinstance(model_or_source, (str, os.PathLike)):
        path = os.fspath(model_or_source)
        if not os.path.exists(path):
            msg = (f"{_CALL}: PATH must name a config.json, a checkpoint file or a folder, but "
                   f"got {path!r}, which does not exist. Check the path.")
            raise ConfigError(msg)
        config = _is_config(path)
        return _config_source(config) if config else _checkpoint_source(path)
    msg = (f"estimate_memory(): model_or_source must be an nn.Module (built under "
           f"init_empty_weights) or a path, but got {type(model_or_source).__name__}. Pass "
           "the config.json's path, or the empty model.")
    raise ConfigError(msg)


def _recast(layout: Layout, dtype: str) -> Layout:
    """The layout with every floating tensor in ``dtype`` (what a model cast to it holds)."""
    tensors = tuple(t if t.dtype.startswith(("int", "uint", "bool")) else
                    dataclasses.replace(t, dtype=dtype) for t in layout.tensors)
    return dataclasses.replace(layout, tensors=tensors)


def _largest_layer(layout: Layout, dtype: str, no_split: Sequence[str]) -> tuple[int, tuple[str, ...]]:
    """The largest layer, by the device-map planner's rule (a module without children or a
    no-split class; the root's own tensors), in ``dtype``."""
    from distlib.big_model.device_map import _Planner
    from distlib.big_model.sizes import module_sizes

    sizes = module_sizes(_recast(layout, dtype))
    planner = _Planner(layout, sizes, {"cpu": 0}, frozenset(no_split))
    return planner.max_size, tuple(sorted(planner.max_names))


def estimate_memory(model_or_source: Any, *, num_processes: int | None = None,
                    mesh: Mesh | str | None = None, dtypes: Sequence[str] = _DEFAULT_DTYPES,
                    optimizer: str = "adamw", tp_plan: Any = "auto") -> MemoryEstimate:
    """Estimate the memory to train a model, per dtype and per strategy, from shapes only.

    Args:
        model_or_source: an ``nn.Module`` (built under `init_empty_weights` costs nothing),
            or the path of a transformers config.json (or its folder) or of a checkpoint.
        num_processes: the ranks (default: the mesh's product, else 1).
        mesh: a `Mesh` or its text (``"dp_shard=4,tp=2"``); default: every rank data-parallel.
        dtypes: the rows, each one of `DTYPES`.
        optimizer: one of `OPTIMIZERS`.
        tp_plan: ``"auto"`` (the model's own) or ``{module pattern: style}`` when tp > 1.

    Returns:
        The frozen `MemoryEstimate`.

    Raises:
        ConfigError: a missing or unreadable source, a config without its sizes, a bad dtype,
            optimizer, mesh or number of processes.
        StrategyError: the mesh cannot split this model.

    Examples:
        >>> import torch
        >>> import distlib as dl
        >>> with dl.init_empty_weights():
        ...     net = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 4))
        >>> est = estimate_memory(net, num_processes=2, dtypes=["float32"])
        >>> row = est.rows[0]
        >>> row.total_bytes, row.largest_layer_bytes, row.largest_layer
        (616, 440, ('0',))
        >>> [(m.strategy, m.total_bytes) for m in row.strategies]
        [('ddp', 2480), ('zero1', 1852), ('zero2', 1852), ('zero3', 1852), ('fsdp', 1248)]
    """
    from distlib.big_model.sizes import dtype_size, module_sizes
    from distlib.training.plan import STRATEGIES, _resolve, plan_rank_memory

    call = "estimate_memory()"
    bad = [d for d in dtypes if d not in DTYPES] if not isinstance(dtypes, str) else [dtypes]
    if bad or not dtypes:
        msg = (f"{call}: dtypes must be a non-empty list of {', '.join(DTYPES)}, but got "
               f"{dtypes!r}. Name the rows to estimate.")
        raise ConfigError(msg)
    if num_processes is not None and (isinstance(num_processes, bool)
                                      or not isinstance(num_processes, int) or num_processes < 1):
        msg = (f"{call}: num_processes must be a positive int, but got {num_processes!r}. Give "
               "the number of ranks the job will have.")
        raise ConfigError(msg)
    the_mesh = parse_mesh(mesh) if isinstance(mesh, str) else (mesh or Mesh())
    if num_processes is None and mesh is None:
        num_processes = 1
    the_mesh = _resolve(the_mesh, num_processes, call)
    source = _source_of(model_or_source)
    rows = []
    num_parameters = 0
    for name in dtypes:
        held, compute, precision = DTYPES[name]
        size = dtype_size(held)
        ranks = [plan_rank_memory(source.planned, the_mesh, strategy=s, precision=precision,
                                  optimizer=optimizer, dtype_bytes=size, tp_plan=tp_plan)
                 for s in STRATEGIES]
        alone = plan_rank_memory(source.planned, Mesh(dp_shard=1), strategy="ddp",
                                 precision=precision, optimizer=optimizer, dtype_bytes=size,
                                 tp_plan=None)
        num_parameters = sum(t.numel for t in source.layout.tensors if not t.buffer)
        largest, names = _largest_layer(source.layout, compute, source.no_split)
        rows.append(DtypeEstimate(
            dtype=name, largest_layer_bytes=largest, largest_layer=names,
            total_bytes=module_sizes(_recast(source.layout, held))[""],
            training_bytes=alone.total_bytes, strategies=tuple(ranks)))
    return MemoryEstimate(mesh=the_mesh, optimizer=optimizer, num_parameters=num_parameters,
                          rows=tuple(rows))


def _print(estimate: MemoryEstimate, source: str) -> None:
    from distlib.training.plan import STRATEGIES

    mesh = estimate.mesh
    ranks = f"{mesh.world_size} rank{'s' if mesh.world_size != 1 else ''} ({mesh})"
    print(f"Memory to train {source!r}: {estimate.num_parameters:,} parameters, optimizer "
          f"{estimate.optimizer}")
    print("\n".join(_table(("dtype", "largest layer", "total size", "training (1 rank)"),
                           [(r.dtype, _human(r.largest_layer_bytes), _human(r.total_bytes),
                             _human(r.training_bytes)) for r in estimate.rows],
                           right=(1, 2, 3))))
    print(f"\nper rank over {ranks}:")
    print("\n".join(_table(("dtype", *STRATEGIES),
                           [(r.dtype, *(_human(m.total_bytes) for m in r.strategies))
                            for r in estimate.rows],
                           right=tuple(range(1, len(STRATEGIES) + 1)), indent="  ")))
    print("\nper rank: parameters + gradients + optimizer states")
    detail = [(r.dtype, m.strategy, _human(m.param_bytes), _human(m.grad_bytes),
               _human(m.optimizer_bytes), _human(m.total_bytes))
              for r in estimate.rows for m in r.strategies]
    print("\n".join(_table(("dtype", "strategy", "parameters", "gradients", "optimizer", "total"),
                           detail, right=(2, 3, 4, 5), indent="  ")))
    print("\nlargest layer: " + ", ".join(estimate.rows[0].largest_layer)
          + "\n  (FSDP gathers one at a time, in the compute dtype; activations are not counted)")
    if mesh.world_size == 1:
        print("hint: pass --num-processes N or --mesh dp_shard=4,tp=2 to split over ranks")


def run(args: argparse.Namespace) -> int:
    """Estimate and print the table (or JSON)."""
    tp_plan: Any = "auto"
    if args.tp_plan is not None:
        try:
            tp_plan = json.loads(args.tp_plan)
        except ValueError as error:
            msg = (f"{_CALL}: --tp-plan must be a JSON object {{module pattern: style}}, but got "
                   f"{args.tp_plan!r}: {error}. Quote it: --tp-plan '{{\"up\": \"colwise\"}}'.")
            raise ConfigError(msg) from error
    estimate = estimate_memory(args.source, num_processes=args.num_processes, mesh=args.mesh,
                               dtypes=args.dtypes or _DEFAULT_DTYPES, optimizer=args.optimizer,
                               tp_plan=tp_plan)
    if args.json:
        print(json.dumps({"source": args.source, **estimate.as_dict()}, indent=2))
        return 0
    _print(estimate, args.source)
    return 0
