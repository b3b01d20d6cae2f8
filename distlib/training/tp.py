"""Tensor parallelism on the mesh's ``tp`` axis: a plan resolved over a model, applied by torch.

`plan_tensor_parallel` turns ``tp_plan`` (``"auto"``: a transformers model's own plan; or a
mapping ``{module name pattern: style}``) into ``{module name: torch ParallelStyle}`` and refuses
what cannot work (a pattern that names no module, an unknown style, heads or widths that the
``tp`` size does not divide) without touching the model. `apply_tensor_parallel` hands the
result to ``torch.distributed.tensor.parallel.parallelize_module``.

The styles keep torch's default ``use_local_output=True``: a column-parallel projection hands
the next op a plain tensor holding this rank's heads, so a transformers attention that reshapes
with ``-1`` heads (``view(*shape, -1, head_dim)``) computes on its local heads, and the
row-parallel output projection sums the partial results (torchtitan's layout).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from distlib.errors import StrategyError
from distlib.training.plan import auto_tp_plan

__all__ = ["AUTO_PLAN", "STYLE_NAMES", "apply_tensor_parallel", "plan_tensor_parallel"]

AUTO_PLAN = "auto"

# A plan's style name -> the torch style it means (transformers' names and their older aliases).
_STYLES: Mapping[str, Callable[[], ParallelStyle]] = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
    "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
    "sequence_parallel": SequenceParallel,
}
STYLE_NAMES = tuple(_STYLES)

_PLAN_EXAMPLE = ("e.g. wrap(model, env, tp_plan={'layers.*.fc1': 'colwise', "
                 "'layers.*.fc2': 'rowwise'})")


def _auto_plan(model: torch.nn.Module) -> dict[str, Any]:
    """The model's own plan (`auto_tp_plan`: transformers' ``model._tp_plan``, else the
    config's), or an error naming what was looked for."""
    plan = auto_tp_plan(model)
    if plan is None:
        msg = (f"wrap(): tp_plan='auto' must find the model's own tensor-parallel plan "
               f"(transformers' model._tp_plan or config.base_model_tp_plan), but got a "
               f"{type(model).__name__} without one. Pass a plan, {_PLAN_EXAMPLE}.")
        raise StrategyError(msg)
    return plan


def _style(pattern: str, style: object) -> ParallelStyle:
    if isinstance(style, ParallelStyle):
        return style
    factory = _STYLES.get(style) if isinstance(style, str) else None
    if factory is None:
        msg = (f"wrap(): tp_plan[{pattern!r}] must be one of {', '.join(map(repr, STYLE_NAMES))} "
               f"or a torch ParallelStyle, but got {style!r}. Map that module to a supported "
               "style, or pass a ParallelStyle (torch.distributed.tensor.parallel) for it.")
        raise StrategyError(msg)
    return factory()


def _check_width(name: str, module: torch.nn.Module, style: ParallelStyle, tp: int) -> None:
    """The dimension a Linear or Embedding is split along must divide by ``tp``."""
    if isinstance(module, torch.nn.Linear):
        dims = {"out_features": module.out_features} if isinstance(style, ColwiseParallel) \
            else {"in_features": module.in_features} if isinstance(style, RowwiseParallel) else {}
    elif isinstance(module, torch.nn.Embedding):
        dims = {"num_embeddings": module.num_embeddings} if isinstance(style, RowwiseParallel) \
            else {"embedding_dim": module.embedding_dim} if isinstance(style, ColwiseParallel) else {}
    else:
        dims = {}
    for dim_name, size in dims.items():
        if size % tp:
            msg = (f"wrap(): tensor parallelism splits {name!r} ({type(style).__name__}) along "
                   f"{dim_name}, which must divide by tp={tp}, but got {dim_name}={size}. Pick a "
                   "tp size that divides it, or leave that module out of tp_plan.")
            raise StrategyError(msg)


def _check_heads(model: torch.nn.Module, tp: int) -> None:
    """Attention heads (and key/value heads) must split evenly over the tp ranks."""
    config = getattr(model, "config", None)
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, key, None)
        if isinstance(heads, int) and heads % tp:
            msg = (f"wrap(): tensor parallelism gives each tp rank whole attention heads, so "
                   f"config.{key} must divide by tp={tp}, but got {key}={heads}. Use a tp size "
                   f"that divides it (at most {heads} for this model), and put the other ranks "
                   "on dp_shard or dp_replicate.")
            raise StrategyError(msg)


def plan_tensor_parallel(model: torch.nn.Module, tp_plan: str | Mapping[str, Any],
                         tp: int) -> dict[str, ParallelStyle]:
    """Resolve ``tp_plan`` over ``model``'s submodules: ``{module name: torch ParallelStyle}``.

    Patterns are ``fnmatch`` patterns over ``model.named_modules()`` names (``*`` spans any
    part: ``"layers.*.mlp.up_proj"``). Style names are those of `STYLE_NAMES` (transformers'
    ``"colwise"``, ``"rowwise"``, ``"colwise_gather_output"``, ...), or a ParallelStyle.

    Args:
        model: the module to plan for (only read).
        tp_plan: ``"auto"`` (the model's own transformers plan) or a mapping.
        tp: the size of the mesh's ``tp`` axis.

    Raises:
        StrategyError: no plan on the model for ``"auto"``; a pattern (of a given mapping)
            that names no module, or a plan naming none at all; an unknown style; two
            patterns giving one module different styles; heads or a split width that ``tp``
            does not divide.

    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> {n: type(s).__name__ for n, s in plan_tensor_parallel(net, {"0": "colwise",
        ...                                                              "2": "rowwise"}, 2).items()}
        {'0': 'ColwiseParallel', '2': 'RowwiseParallel'}
    """
    auto = isinstance(tp_plan, str)
    if (auto and tp_plan != AUTO_PLAN) or not (auto or isinstance(tp_plan, Mapping)):
        msg = (f"wrap(): tp_plan must be 'auto' or a mapping {{module pattern: style}}, but got "
               f"{tp_plan!r}. Use 'auto' for a transformers model, else a mapping, "
               f"{_PLAN_EXAMPLE}.")
        raise StrategyError(msg)
    patterns = _auto_plan(model) if auto else dict(tp_plan)  # type: ignore[arg-type]
    modules = dict(model.named_modules())
    plan: dict[str, ParallelStyle] = {}
    chosen: dict[str, str] = {}
    for pattern, style_spec in patterns.items():
        style = _style(pattern, style_spec)
        names = [n for n in modules if n and fnmatch.fnmatchcase(n, str(pattern))]
        if not names and not auto:
            msg = (f"wrap(): tp_plan pattern {pattern!r} must name a submodule of the model, but "
                   f"got none that matches (the model has e.g. {list(modules)[1:6]}). Check the "
                   "pattern against model.named_modules().")
            raise StrategyError(msg)
        for name in names:
            if name in chosen and repr(style_spec) != chosen[name]:
                msg = (f"wrap(): tp_plan must give each module one style, but got {name!r} "
                       f"as {chosen[name]} and {style_spec!r}. Make the patterns disjoint.")
                raise StrategyError(msg)
            _check_width(name, modules[name], style, tp)
            chosen[name] = repr(style_spec)
            plan[name] = style
    if not plan:
        msg = (f"wrap(): tp_plan must name at least one submodule of the model, but got "
               f"{patterns!r}, which names none of a {type(model).__name__}. {_PLAN_EXAMPLE}.")
        raise StrategyError(msg)
    _check_heads(model, tp)
    _check_tied(model, plan)
    return plan


def _check_tied(model: torch.nn.Module, plan: Mapping[str, ParallelStyle]) -> None:
    """Refuse a plan that shards a module holding a tied parameter (an lm_head tied to the
    embedding): torch would give that module a DTensor of its own, silently untying it."""
    holders: dict[int, list[tuple[str, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for leaf, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append((name, leaf))
    for places in holders.values():
        planned = sorted({name for name, _ in places if name in plan})
        if len({name for name, _ in places}) > 1 and planned:
            tied = [f"{name}.{leaf}" if name else leaf for name, leaf in places]
            msg = (f"wrap(): tensor parallelism must keep tied weights one tensor, but got "
                   f"{tied} tied and tp_plan sharding {planned} (each would get a DTensor of "
                   "its own, and training would untie them). Build the model untied (e.g. "
                   "config.tie_word_embeddings=False), or leave those modules out of tp_plan.")
            raise StrategyError(msg)


def apply_tensor_parallel(model: torch.nn.Module, tp_mesh: Any,
                          plan: Mapping[str, ParallelStyle]) -> None:
    """Shard the planned submodules over ``tp_mesh`` (torch's ``parallelize_module``).

    Effects: replaces the planned modules' parameters with DTensors sharded over the tp ranks
    and hooks their inputs and outputs (in place, on ``model``).
    """
    parallelize_module(model, tp_mesh, dict(plan))
