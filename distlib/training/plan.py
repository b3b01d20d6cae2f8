"""Plan a mesh before any process starts: the divisibility checks and each rank's bytes (pure).

`plan_parallelism` reads a model's shapes — from a transformers config (a dict or a
``PretrainedConfig``; Llama, Mistral and Qwen2 layouts are counted from the config alone) or
from an ``nn.Module`` built under ``init_empty_weights`` — and a `Mesh`, and returns a
`ParallelPlan`: what each rank holds for parameters, gradients and optimizer states.
`check_parallelism` is the part `wrap` runs first: it raises, naming every rule the mesh breaks.

The rules (the same ones `wrap` applies):

* ``tp`` shards what the tensor-parallel plan names: a colwise ``nn.Linear`` on its output
  dim (weight and bias), a rowwise one on its input dim (bias replicated), a rowwise
  ``nn.Embedding`` on the vocabulary, a colwise one on the embedding dim; everything else
  (norms) is replicated on the ``tp`` axis.
* ``dp_shard`` shards every tensor on dim 0 as FSDP2 does: ``ceil(rows / dp_shard)`` rows per
  rank, the last ranks padded. ``dp_replicate`` and ``cp`` replicate.
* Parameters and gradients keep the parameters' own dtype: a config's model is fp32 (its
  ``torch_dtype`` is the checkpoint's storage, not what training holds). ``bf16``/``fp16``
  compute in low precision — autocast, or FSDP2's ``MixedPrecisionPolicy`` — over fp32
  master weights, so they change no persistent byte; the plan records the compute dtype.
* AdamW/Adam keep two states in the parameter dtype plus a 4-byte ``step`` per tensor (as
  ``torch.optim`` does); SGD keeps none, SGD with momentum one.
* ``dtype_bytes`` holds every parameter in that many bytes (a model cast to half: 2), and
  its gradients and optimizer states with it, as ``torch.optim`` keeps them.

`plan_rank_memory` puts the strategies on these rules (`STRATEGIES`): DDP replicates over the
data-parallel ranks; ZeRO is DeepSpeed's layout: every
stage keeps an fp32 master partition (a copy even in fp32 training) with the optimizer's fp32
states and one ``step``, and holds the gradients as this rank's fp32 partition at the step
(stage 1 too: DeepSpeed's default ``contiguous_gradients`` reduces them into the partition
during the backward); stages 1 and 2 keep the whole parameters (half under ``bf16``/``fp16``),
stage 3 a partition, and stage 3 keeps its gradient partition buffer besides the fp32 copy
its step makes (measured on DeepSpeed 0.19, fp32 and bf16). FSDP is the planner's
``dp_shard`` (FSDP2: fp32 masters, half compute only).

This module imports no torch; a module's layer types are read through torch only when one is
given.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distlib.errors import ConfigError, StrategyError
from distlib.precision import Precision, parse_precision
from distlib.topology import Mesh

__all__ = ["CONFIG_MODEL_TYPES", "OPTIMIZERS", "STRATEGIES", "TP_STYLES", "ParallelPlan",
           "RankMemory", "TensorPlan", "auto_tp_plan", "check_parallelism", "plan_parallelism",
           "plan_rank_memory"]

# optimizer -> (states the size of the parameter, bytes of scalar state per tensor)
OPTIMIZERS: dict[str, tuple[int, int]] = {"adamw": (2, 4), "adam": (2, 4), "sgd": (0, 0),
                                          "sgd_momentum": (1, 0)}
# tensor-parallel style -> "col" (output side), "row" (input side) or None (no weight sharded).
# transformers' names and torch's ParallelStyle classes (ColwiseParallel, ...) both map here.
TP_STYLES: dict[str, str | None] = {
    "colwise": "col", "colwise_rep": "col", "colwise_gather_output": "col",
    "packed_colwise": "col", "embedding_colwise": "col",
    "rowwise": "row", "rowwise_rep": "row", "rowwise_split_input": "row",
    "packed_rowwise": "row", "embedding_rowwise": "row",
    "sequence_parallel": None, "replicate": None, "replicated_with_grad_allreduce": None,
    "all_reduce": None,
}
_TORCH_STYLES = {"ColwiseParallel": "colwise", "RowwiseParallel": "rowwise",
                 "SequenceParallel": "sequence_parallel", "PrepareModuleInput": "replicate",
                 "PrepareModuleOutput": "replicate", "PrepareModuleInputOutput": "replicate"}
# model_type -> (q/k/v bias, o bias) beyond the config's attention_bias; counted from a config
CONFIG_MODEL_TYPES: dict[str, tuple[bool, bool]] = {"llama": (False, False),
                                                    "mistral": (False, False),
                                                    "qwen2": (True, False)}
# transformers' own plan for these layouts (LlamaForCausalLM._tp_plan in transformers 5)
_LLAMA_TP_PLAN = {
    "model.embed_tokens": "embedding_rowwise",
    "model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise", "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise", "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise", "lm_head": "colwise_gather_output",
}
# a sharded module's last name -> the config size its sharding splits
_ROLES = {"q_proj": "num_attention_heads", "o_proj": "num_attention_heads",
          "k_proj": "num_key_value_heads", "v_proj": "num_key_value_heads",
          "gate_proj": "intermediate_size", "up_proj": "intermediate_size",
          "down_proj": "intermediate_size", "embed_tokens": "vocab_size", "lm_head": "vocab_size"}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "vocab_size")


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorPlan:
    """One parameter under the mesh: its shape, where ``tp`` cuts it, what a rank allocates.

    Attributes:
        name: the parameter's name (the first one, for tied parameters).
        shape: the full shape.
        itemsize: bytes per element.
        tp_dim: the dim ``tp`` shards, or None (replicated on the ``tp`` axis).
        style: the tensor-parallel style that names it, or None.
        local_shape: the shape on one rank of the ``tp`` axis.
        rank_numel: elements one rank allocates (FSDP2 pads dim 0 to ``dp_shard`` equal rows).
    """

    name: str
    shape: tuple[int, ...]
    itemsize: int
    tp_dim: int | None
    style: str | None
    local_shape: tuple[int, ...]
    rank_numel: int

    @property
    def numel(self) -> int:
        """Elements of the whole tensor."""
        return math.prod(self.shape)

    def held_numel(self, dp_shard_index: int, dp_shard: int) -> int:
        """Elements (no padding) rank ``dp_shard_index`` of ``dp_shard`` really holds."""
        rows = self.local_shape[0] if self.local_shape else 1
        chunk = -(-rows // dp_shard)
        held = max(0, min(chunk, rows - dp_shard_index * chunk))
        return held * math.prod(self.local_shape[1:])


@dataclass(frozen=True, slots=True, kw_only=True)
class ParallelPlan:
    """What each rank of a mesh holds for one model: per-rank bytes, shard factors, checks.

    Every rank allocates the same bytes (FSDP2 pads), so one number per kind says it.

    Attributes:
        mesh: the resolved mesh.
        precision: the compute precision (master parameters stay in their own dtype).
        optimizer: one of `OPTIMIZERS`.
        num_parameters: parameters of the model (tied ones once).
        total_param_bytes: the unsharded parameters' bytes (what one process would hold).
        param_bytes: parameters one rank allocates; ``grad_bytes`` the same for gradients.
        grad_bytes: gradients one rank allocates.
        optimizer_bytes: optimizer states one rank allocates.
        shard_factors: ``(axis, factor)``: how many times each axis divides the parameters'
            bytes (``tp`` below its size when norms stay replicated; 1 for replicating axes).
        tensors: one `TensorPlan` per parameter.
        checks: the rules checked and met; ``unchecked``: those that could not be checked, why.
        unchecked: rules not checked, each with its reason.
    """

    mesh: Mesh
    precision: Precision
    optimizer: str
    num_parameters: int
    total_param_bytes: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    shard_factors: tuple[tuple[str, float], ...]
    # one entry per parameter (hundreds for a large model): left out of the repr
    tensors: tuple[TensorPlan, ...] = dataclasses.field(repr=False)
    checks: tuple[str, ...] = ()
    unchecked: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        sizes = (self.num_parameters, self.total_param_bytes, self.param_bytes,
                 self.grad_bytes, self.optimizer_bytes)
        if any(not isinstance(n, int) or n < 0 for n in sizes):
            msg = f"ParallelPlan(): byte and parameter counts must be ints >= 0, but got {sizes}."
            raise ConfigError(msg)

    @property
    def rank_bytes(self) -> int:
        """Parameters, gradients and optimizer states of one rank."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    def held_param_bytes(self, rank: int) -> int:
        """Parameter bytes ``rank`` really holds (its FSDP2 shard without the padding)."""
        index = self.mesh.coordinates(rank)["dp_shard"]
        return sum(t.held_numel(index, self.mesh.dp_shard) * t.itemsize for t in self.tensors)


@dataclass(frozen=True, slots=True)
class _Meta:
    tensors: tuple[tuple[str, tuple[int, ...], int, str], ...]  # name, shape, itemsize, kind
    sizes: Mapping[str, int]  # the config's sizes the roles check
    auto_plan: Mapping[str, Any] | None


def check_parallelism(model: Any, mesh: Mesh, *, tp_plan: Any = "auto", seq_len: int | None = None,
                      world_size: int | None = None) -> tuple[str, ...]:
    """Raise unless ``mesh`` can split ``model``; return the rules checked.

    Args:
        model: an ``nn.Module`` (real or empty) or a transformers config (dict or object).
        mesh: the mesh; resolved, or resolved here against ``world_size``.
        tp_plan: ``"auto"`` (the model's own plan), ``{module pattern: style}``, or None
            (no tensor parallelism: only with ``tp == 1``).
        seq_len: the training sequence length, checked against ``cp``.
        world_size: the ranks the job will have (checked against the mesh's product).

    Raises:
        ConfigError: the mesh, the world size or ``seq_len`` is malformed.
        StrategyError: the mesh cannot split this model (each broken rule is named).

    Examples:
        >>> cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 128}
        >>> check_parallelism(cfg, Mesh(dp_shard=2, tp=2), world_size=4)[0]
        'world size 4 = dp_shard=2 x tp=2'
    """
    return _check(model, mesh, tp_plan, seq_len, world_size, "check_parallelism()")[1]


def plan_parallelism(model_or_config: Any, mesh: Mesh, *, precision: object = "no",
                     optimizer: str = "adamw", tp_plan: Any = "auto", seq_len: int | None = None,
                     world_size: int | None = None, dtype_bytes: int | None = None) -> ParallelPlan:
    """Plan what each rank of ``mesh`` holds for a model, after `check_parallelism`'s checks.

    Args:
        model_or_config: an ``nn.Module`` (built under ``init_empty_weights`` costs nothing),
            a transformers config (dict or ``PretrainedConfig``) of a supported layout, or a
            sequence of ``(name, shape, itemsize)`` (a checkpoint's headers).
        mesh: the mesh; resolved, or resolved here against ``world_size``.
        precision: ``"no"``, ``"fp16"``, ``"bf16"`` or ``"fp8"``.
        optimizer: one of ``adamw``, ``adam``, ``sgd``, ``sgd_momentum``.
        tp_plan: ``"auto"`` or ``{module pattern: style}`` (see `TP_STYLES`).
        seq_len: the sequence length (checked against ``cp``).
        world_size: the job's ranks, to resolve or check the mesh.
        dtype_bytes: bytes per element every parameter is held in (None: each one's own).

    Returns:
        The frozen `ParallelPlan`.

    Raises:
        ConfigError: a malformed mesh, precision, optimizer or ``seq_len``.
        StrategyError: the mesh cannot split this model.

    Examples:
        >>> cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 128}
        >>> plan = plan_parallelism(cfg, Mesh(dp_shard=2, tp=2))
        >>> plan.num_parameters, plan.param_bytes, plan.optimizer_bytes
        (90432, 90752, 181588)
    """
    call = "plan_parallelism()"
    prec = parse_precision(precision)
    if optimizer not in OPTIMIZERS:
        msg = (f"{call}: optimizer must be one of {', '.join(OPTIMIZERS)}, but got "
               f"{optimizer!r}. Name the optimizer whose states to count.")
        raise ConfigError(msg)
    if dtype_bytes is not None and (isinstance(dtype_bytes, bool) or dtype_bytes not in (1, 2, 4, 8)):
        msg = (f"{call}: dtype_bytes must be 1, 2, 4, 8 or None, but got {dtype_bytes!r}. Give "
               "the bytes of one element of the dtype the parameters are held in.")
        raise ConfigError(msg)
    mesh, checks, unchecked, tensors = _check(model_or_config, mesh, tp_plan, seq_len,
                                              world_size, call)
    if dtype_bytes is not None:
        tensors = tuple(dataclasses.replace(t, itemsize=dtype_bytes) for t in tensors)
    num = sum(t.numel for t in tensors)
    total = sum(t.numel * t.itemsize for t in tensors)
    local = sum(math.prod(t.local_shape) * t.itemsize for t in tensors)
    params = sum(t.rank_numel * t.itemsize for t in tensors)
    states, scalar = OPTIMIZERS[optimizer]
    factors = (("dp_replicate", 1.0), ("dp_shard", local / params if params else 1.0),
               ("cp", 1.0), ("tp", total / local if local else 1.0))
    return ParallelPlan(mesh=mesh, precision=prec, optimizer=optimizer, num_parameters=num,
                        total_param_bytes=total, param_bytes=params, grad_bytes=params,
                        optimizer_bytes=states * params + scalar * len(tensors),
                        shard_factors=factors, tensors=tensors, checks=checks,
                        unchecked=unchecked)


STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")


@dataclass(frozen=True, slots=True, kw_only=True)
class RankMemory:
    """The bytes one rank holds under a strategy: parameters, gradients, optimizer states.

    Attributes:
        strategy: one of `STRATEGIES`.
        mesh: the mesh the strategy shards over (DDP and ZeRO: the data-parallel ranks).
        param_bytes: parameters one rank allocates.
        grad_bytes: gradients one rank allocates.
        optimizer_bytes: optimizer states (with any fp32 master copy) one rank allocates.
    """

    strategy: str
    mesh: Mesh
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        """Parameters, gradients and optimizer states of one rank."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def plan_rank_memory(model_or_config: Any, mesh: Mesh, *, strategy: str = "fsdp",
                     precision: object = "no", optimizer: str = "adamw",
                     dtype_bytes: int | None = None, tp_plan: Any = "auto",
                     world_size: int | None = None) -> RankMemory:
    """Per-rank bytes under one strategy, from `plan_parallelism`'s plans (pure).

    The data-parallel ranks are ``dp_replicate * dp_shard`` of ``mesh``; ``tp`` and ``cp`` stay.
    ``fsdp`` plans ``mesh`` itself (HSDP when ``dp_replicate > 1``), or shards over every
    data-parallel rank when ``dp_shard`` is 1. ``ddp`` replicates; ``zero1``..``zero3`` take
    the replicated plan's bytes for what they keep whole and the sharded plan's for the rest,
    with DeepSpeed's fp32 master partition (in fp32 too) and the gradients it holds at its
    step (the fp32 partition; stage 3 also its partition buffer).

    Args:
        model_or_config: what `plan_parallelism` takes.
        mesh: the mesh (its data-parallel size is what the strategies shard over).
        strategy: one of `STRATEGIES`.
        precision: the compute precision; under ``bf16``/``fp16`` ZeRO keeps DeepSpeed's half
            parameters (and stage 3's half gradient partition) plus fp32 masters.
        optimizer: one of `OPTIMIZERS`.
        dtype_bytes: bytes the parameters are held in (None: their own).
        tp_plan: as for `plan_parallelism`.
        world_size: the job's ranks, to resolve or check the mesh.

    Raises:
        ConfigError: a malformed strategy, mesh, precision or optimizer.
        StrategyError: the mesh cannot split this model.

    Examples:
        >>> cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 128}
        >>> [plan_rank_memory(cfg, Mesh(dp_shard=8), strategy=s).total_bytes
        ...  for s in ("ddp", "zero1", "zero2", "zero3")]
        [1446996, 542596, 542596, 271300]
    """
    call = "plan_rank_memory()"
    if strategy not in STRATEGIES:
        msg = (f"{call}: strategy must be one of {', '.join(STRATEGIES)}, but got "
               f"{strategy!r}. Name how the data-parallel ranks split the model.")
        raise ConfigError(msg)
    resolved = _resolve(mesh, world_size, call)
    dp = resolved.dp_replicate * resolved.dp_shard
    whole = Mesh(dp_replicate=dp, dp_shard=1, cp=resolved.cp, tp=resolved.tp)
    split = (resolved if strategy == "fsdp" and resolved.dp_shard > 1 else
             Mesh(dp_replicate=1, dp_shard=dp, cp=resolved.cp, tp=resolved.tp))
    prec = parse_precision(precision)
    half = strategy.startswith("zero") and prec.value in ("bf16", "fp16")

    def plan(on: Mesh, size: int | None) -> ParallelPlan:
        return plan_parallelism(model_or_config, on, precision=prec, optimizer=optimizer,
                                tp_plan=tp_plan, dtype_bytes=size)

    replicated = plan(whole, 2 if half else dtype_bytes)
    sharded = plan(split, 2 if half else dtype_bytes) if strategy != "ddp" else replicated
    states, scalar = OPTIMIZERS[optimizer]
    params = (sharded if strategy in ("zero3", "fsdp") else replicated).param_bytes
    grads = (sharded if strategy in ("zero2", "zero3", "fsdp") else replicated).grad_bytes
    if strategy.startswith("zero"):
        # DeepSpeed clones an fp32 master partition even when training in fp32, and steps one
        # flat partition per group (one ``step`` scalar); its states are fp32 like the master.
        master = plan(split, 4)
        optimizer_bytes = (1 + states) * master.param_bytes + scalar
        grads = _zero_grad_bytes(strategy, sharded.grad_bytes, master.param_bytes)
    else:
        optimizer_bytes = (replicated if strategy == "ddp" else sharded).optimizer_bytes
    return RankMemory(strategy=strategy, mesh=split if strategy != "ddp" else whole,
                      param_bytes=params, grad_bytes=grads, optimizer_bytes=optimizer_bytes)


def _zero_grad_bytes(strategy: str, partition: int, fp32_partition: int) -> int:
    """Gradient bytes a ZeRO rank holds at the optimizer step (measured: DeepSpeed 0.19).

    With DeepSpeed's default ``contiguous_gradients`` every stage (1 included) reduces the
    gradients into this rank's partition during the backward, and its step hands the inner
    optimizer the partition in fp32 (in fp32 and in bf16 alike, the only gradient left);
    stage 3 keeps its gradient partition buffer, in the parameters' dtype, besides that copy.
    """
    return fp32_partition + (partition if strategy == "zero3" else 0)


def _check(model: Any, mesh: Mesh, tp_plan: Any, seq_len: int | None, world_size: int | None,
           call: str) -> tuple[Mesh, tuple[str, ...], tuple[str, ...], tuple[TensorPlan, ...]]:
    mesh = _resolve(mesh, world_size, call)
    meta = _meta_of(model, call)
    styles = _styles(tp_plan, meta, mesh.tp, call)
    tensors = tuple(_place(name, shape, itemsize, kind, styles, mesh, call)
                    for name, shape, itemsize, kind in meta.tensors)
    _check_patterns(tp_plan, styles, tensors, call)
    checks = [f"world size {mesh.world_size} = {mesh}"]
    unchecked: list[str] = []
    broken, need = _divisibility(tensors, meta.sizes, mesh.tp, checks)
    need = need if broken else []  # suggest tp sizes only when a tp rule is broken
    if mesh.cp > 1 and seq_len is None:
        unchecked.append(f"seq_len % (2*cp={2 * mesh.cp}) == 0: no seq_len given")
    elif seq_len is not None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            msg = f"{call}: seq_len must be a positive int or None, but got {seq_len!r}."
            raise ConfigError(msg)
        if mesh.cp > 1 and seq_len % (2 * mesh.cp):
            broken.append(f"seq_len ({seq_len}) must be divisible by 2*cp ({2 * mesh.cp}): "
                          "torch's load-balanced split cuts the sequence into 2*cp chunks")
        elif mesh.cp > 1:
            checks.append(f"seq_len {seq_len} % (2*cp={2 * mesh.cp}) == 0")
    if broken:
        msg = (f"{call}: the mesh {mesh} cannot split this model: " + "; ".join(broken)
               + f". {_fix(need, mesh)}")
        raise StrategyError(msg)
    return mesh, tuple(checks), tuple(unchecked), tensors


def _resolve(mesh: Mesh, world_size: int | None, call: str) -> Mesh:
    if not isinstance(mesh, Mesh):
        msg = (f"{call}: mesh must be a distlib Mesh, but got {mesh!r}. Build one: "
               "Mesh(dp_shard=2, tp=2), or parse_mesh('dp_shard=2,tp=2').")
        raise ConfigError(msg)
    if world_size is None:
        if not mesh.is_resolved:
            msg = (f"{call}: the mesh must give every size when no world_size is given, but got "
                   f"{mesh!r}. Pass world_size= (--num-processes) or size every axis.")
            raise ConfigError(msg)
        return mesh
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        msg = f"{call}: world_size must be a positive int or None, but got {world_size!r}."
        raise ConfigError(msg)
    known = math.prod(s for s in mesh.sizes.values() if s != -1)
    if (mesh.is_resolved and known != world_size) or world_size % known:
        msg = (f"{call}: the world size must be the product of the mesh's sizes (a -1 size "
               f"takes what the others leave), but got "
               f"world size {world_size} for {mesh} (product {known}). Change a size, or the "
               "number of processes.")
        raise ConfigError(msg)
    return mesh.resolve(world_size)


def _meta_of(model: Any, call: str) -> _Meta:
    if hasattr(model, "named_parameters"):
        return _module_meta(model)
    if isinstance(model, (list, tuple)):
        return _headers_meta(model, call)
    if isinstance(model, Mapping) or hasattr(model, "to_dict"):
        config = dict(model) if isinstance(model, Mapping) else {
            **model.to_dict(), "base_model_tp_plan": getattr(model, "base_model_tp_plan", None)}
        return _config_meta(config, call)
    msg = (f"{call}: the model must be an nn.Module or a transformers config (dict or "
           f"PretrainedConfig), but got {type(model).__name__}. Build it under "
           "dl.init_empty_weights() to plan without memory.")
    raise ConfigError(msg)


def _config_meta(cfg: dict[str, Any], call: str) -> _Meta:
    model_type = cfg.get("model_type", "llama")
    missing = [k for k in _REQUIRED if not isinstance(cfg.get(k), int)]
    if model_type not in CONFIG_MODEL_TYPES or missing:
        msg = (f"{call}: a config must be of a layout the planner counts "
               f"({', '.join(CONFIG_MODEL_TYPES)}) with int {', '.join(_REQUIRED)}, but got "
               f"model_type={model_type!r}" + (f" without {', '.join(missing)}" if missing else "")
               + ". Plan an empty model instead: with dl.init_empty_weights(): "
               "model = AutoModelForCausalLM.from_config(config).")
        raise ConfigError(msg)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    qkv_bias, o_bias = CONFIG_MODEL_TYPES[model_type]
    qkv_bias = qkv_bias or bool(cfg.get("attention_bias"))
    o_bias = o_bias or bool(cfg.get("attention_bias"))
    mlp_bias, inter, vocab = bool(cfg.get("mlp_bias")), cfg["intermediate_size"], cfg["vocab_size"]
    out: list[tuple[str, tuple[int, ...], int, str]] = [
        ("model.embed_tokens.weight", (vocab, hidden), 4, "embedding")]
    linears = (("self_attn.q_proj", heads * head_dim, hidden, qkv_bias),
               ("self_attn.k_proj", kv * head_dim, hidden, qkv_bias),
               ("self_attn.v_proj", kv * head_dim, hidden, qkv_bias),
               ("self_attn.o_proj", hidden, heads * head_dim, o_bias),
               ("mlp.gate_proj", inter, hidden, mlp_bias), ("mlp.up_proj", inter, hidden, mlp_bias),
               ("mlp.down_proj", hidden, inter, mlp_bias))
    for i in range(cfg["num_hidden_layers"]):
        for name, rows, cols, bias in linears:
            out.append((f"model.layers.{i}.{name}.weight", (rows, cols), 4, "linear"))
            if bias:
                out.append((f"model.layers.{i}.{name}.bias", (rows,), 4, "linear"))
        out += [(f"model.layers.{i}.{n}.weight", (hidden,), 4, "other")
                for n in ("input_layernorm", "post_attention_layernorm")]
    out.append(("model.norm.weight", (hidden,), 4, "other"))
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (vocab, hidden), 4, "linear"))
    sizes = {"num_attention_heads": heads, "num_key_value_heads": kv, "hidden_size": hidden,
             "intermediate_size": inter, "vocab_size": vocab}
    auto = cfg.get("base_model_tp_plan")
    plan = _LLAMA_TP_PLAN if not auto else {
        "model.embed_tokens": "embedding_rowwise", **{f"model.{k}": v for k, v in auto.items()},
        "lm_head": "colwise_gather_output"}
    return _Meta(tuple(out), sizes, plan)


def _headers_meta(tensors: Any, call: str) -> _Meta:
    """``(name, shape, itemsize)`` entries (a checkpoint's headers): 2-D tensors count as
    linear layers for a ``tp_plan``; there is no plan of the model's own."""
    out: list[tuple[str, tuple[int, ...], int, str]] = []
    for entry in tensors:
        ok = (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)
              and isinstance(entry[1], (list, tuple))
              and all(isinstance(d, int) and d >= 0 for d in entry[1])
              and isinstance(entry[2], int) and entry[2] > 0)
        if not ok:
            msg = (f"{call}: each tensor entry must be (name, shape, itemsize) with a str name, "
                   f"int dims >= 0 and an int itemsize > 0, but got {entry!r}. Give a "
                   "checkpoint's headers as such triples.")
            raise ConfigError(msg)
        name, shape, itemsize = entry
        out.append((name, tuple(shape), itemsize, "linear" if len(shape) == 2 else "other"))
    return _Meta(tuple(out), {}, None)


def auto_tp_plan(model: Any) -> dict[str, Any] | None:
    """The tensor-parallel plan ``tp_plan="auto"`` means for ``model``; None when it has none.

    The one reader of a model's own plan, for the planner here and for `wrap`'s
    ``distlib.training.tp``: transformers' ``model._tp_plan`` (full module names), else its
    ``config.base_model_tp_plan``, whose names are the base model's (prefixed here by
    ``model.base_model_prefix`` when the model holds its base model under that name).

    Examples:
        >>> from types import SimpleNamespace as Model
        >>> auto_tp_plan(Model(_tp_plan={"lm_head": "colwise_rep"}))
        {'lm_head': 'colwise_rep'}
        >>> plan = {"layers.*.mlp.up_proj": "colwise"}
        >>> auto_tp_plan(Model(_tp_plan={}, config=Model(base_model_tp_plan=plan),
        ...                    base_model_prefix="model", model=Model()))
        {'model.layers.*.mlp.up_proj': 'colwise'}
        >>> auto_tp_plan(Model(config=Model(base_model_tp_plan=plan)))  # the base model itself
        {'layers.*.mlp.up_proj': 'colwise'}
        >>> auto_tp_plan(Model()) is None
        True
    """
    own = getattr(model, "_tp_plan", None)
    if own:
        return dict(own)
    config_plan = getattr(getattr(model, "config", None), "base_model_tp_plan", None)
    if not config_plan:
        return None
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix):
        return {f"{prefix}.{pattern}": style for pattern, style in config_plan.items()}
    return dict(config_plan)


def _module_meta(model: Any) -> _Meta:
    import torch  # a module was given: torch is already imported

    modules = dict(model.named_modules())
    out = []
    for name, param in model.named_parameters():
        owner = modules.get(name.rpartition(".")[0])
        kind = ("embedding" if isinstance(owner, torch.nn.Embedding) else
                "linear" if isinstance(owner, torch.nn.Linear) else "other")
        out.append((name, tuple(int(d) for d in param.shape), int(param.element_size()), kind))
    config = getattr(model, "config", None)
    sizes = {k: v for k in {*_ROLES.values(), "hidden_size"}
             if isinstance(v := getattr(config, k, None), int)}
    return _Meta(tuple(out), sizes, auto_tp_plan(model))


def _styles(tp_plan: Any, meta: _Meta, tp: int, call: str) -> dict[str, str]:
    """The plan as ``{module pattern: style name}`` (empty when tp == 1 and nothing asked)."""
    if tp_plan is None and tp == 1:
        return {}  # no tensor parallelism asked, none needed
    if isinstance(tp_plan, str) and tp_plan == "auto":
        if meta.auto_plan is None:
            if tp > 1:
                msg = (f"{call}: tp_plan='auto' needs a model with its own tensor-parallel plan "
                       f"(a transformers model's _tp_plan) when tp={tp}, but this model has "
                       "none. Pass tp_plan={'layers.*.fc1': 'colwise', 'layers.*.fc2': "
                       "'rowwise'} naming your modules.")
                raise StrategyError(msg)
            return {}
        plan: Mapping[str, Any] = meta.auto_plan
    elif isinstance(tp_plan, Mapping):
        plan = tp_plan
    else:
        msg = (f"{call}: tp_plan must be 'auto' or a mapping {{module pattern: style}}, but got "
               f"{tp_plan!r}.")
        raise StrategyError(msg)
    out: dict[str, str] = {}
    for pattern, style in plan.items():
        name = style if isinstance(style, str) else _TORCH_STYLES.get(type(style).__name__, "")
        if name not in TP_STYLES:
            msg = (f"{call}: tp_plan[{pattern!r}] must be one of {', '.join(TP_STYLES)} or "
                   f"torch's {', '.join(_TORCH_STYLES)}, but got {style!r}. The planner "
                   "counts only these styles.")
            raise StrategyError(msg)
        out[str(pattern)] = name
    return out


def _matches(pattern: str, module: str) -> bool:
    atoms, names = pattern.split("."), module.split(".")
    return len(atoms) == len(names) and all(map(fnmatch.fnmatchcase, names, atoms))


def _place(name: str, shape: tuple[int, ...], itemsize: int, kind: str,
           styles: Mapping[str, str], mesh: Mesh, call: str) -> TensorPlan:
    module, _, leaf = name.rpartition(".")
    style = next((s for p, s in styles.items() if _matches(p, module)), None)
    family = TP_STYLES.get(style) if style else None
    dim: int | None = None
    if family is not None:
        if kind == "other":
            msg = (f"{call}: tp_plan style {style!r} applies to nn.Linear and nn.Embedding, but "
                   f"got {name} of another layer type. Leave that module out of tp_plan.")
            raise StrategyError(msg)
        if kind == "embedding":
            dim = 1 if family == "col" else 0
        elif leaf == "bias":
            dim = 0 if family == "col" else None
        else:
            dim = 0 if family == "col" else len(shape) - 1
    local = list(shape)
    if dim is not None and mesh.tp > 1:
        local[dim] = shape[dim] // mesh.tp
    rows = local[0] if local else 1
    rank_numel = -(-rows // mesh.dp_shard) * math.prod(local[1:])
    return TensorPlan(name=name, shape=shape, itemsize=itemsize, tp_dim=dim, style=style,
                      local_shape=tuple(local), rank_numel=rank_numel)


def _check_patterns(tp_plan: Any, styles: Mapping[str, str], tensors: tuple[TensorPlan, ...],
                    call: str) -> None:
    if not isinstance(tp_plan, Mapping):
        return  # the model's own plan may name modules this model lacks (transformers too)
    used: set[str] = set()
    for t in tensors:
        module = t.name.rpartition(".")[0]
        used.update(p for p in styles if _matches(p, module))
    unused = [p for p in styles if p not in used]
    if unused:
        msg = (f"{call}: every tp_plan pattern must name a module with parameters, but got "
               f"{unused} matching none. Patterns are module paths with * for an index, "
               "such as 'model.layers.*.mlp.up_proj'.")
        raise StrategyError(msg)


def _divisibility(tensors: tuple[TensorPlan, ...], sizes: Mapping[str, int], tp: int,
                  checks: list[str]) -> tuple[list[str], list[int]]:
    """The broken tensor-parallel rules and the sizes tp must divide (the met rules go to
    ``checks``)."""
    cut = [t for t in tensors if t.tp_dim is not None]
    if tp == 1 or not cut:
        return [], []
    roles = {_ROLES[r] for t in cut
             if (r := t.name.rpartition(".")[0].rpartition(".")[2]) in _ROLES}
    roles.add("hidden_size")
    broken: list[str] = []
    for role in sorted(roles & set(sizes)):
        if sizes[role] % tp:
            broken.append(f"{role} ({sizes[role]}) must be divisible by tp ({tp})")
        else:
            checks.append(f"{role} {sizes[role]} % tp={tp} == 0")
    uneven = [t for t in cut if t.shape[t.tp_dim or 0] % tp]
    if uneven and not broken:  # a size above names the cause; else name the tensors
        broken += [f"{t.name} dim {t.tp_dim} ({t.shape[t.tp_dim or 0]}) must be divisible by "
                   f"tp ({tp})" for t in uneven[:4]]
        if len(uneven) > 4:
            broken.append(f"and {len(uneven) - 4} more tensors")
    if not uneven:
        checks.append(f"every tensor tp shards ({len(cut)}) splits evenly by tp={tp}")
    return broken, [sizes[r] for r in roles & set(sizes)] + [t.shape[t.tp_dim or 0] for t in cut]


def _fix(need: list[int], mesh: Mesh) -> str:
    parts = []
    if need:
        good = [n for n in range(1, 65) if all(v % n == 0 for v in need)]
        parts.append(f"the tp sizes this model allows are {', '.join(map(str, good))}")
    if mesh.cp > 1:
        parts.append(f"with cp={mesh.cp}, pad the sequence to a multiple of {2 * mesh.cp}")
    text = "; ".join(parts)
    return f"{text[:1].upper()}{text[1:]}." if parts else ""
