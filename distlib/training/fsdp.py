"""The `FSDP` applier: FSDP2 (``torch.distributed.fsdp.fully_shard``), units first, then the root."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._composable.checkpoint_activation import checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from distlib.env import Env
from distlib.errors import StrategyError
from distlib.precision import compute_dtype
from distlib.runtime import device_mesh, initialize, is_initialized
from distlib.strategies.fsdp import AUTO, FSDP
from distlib.training.accumulation import MicroStep
from distlib.training.single import SingleWrapped, place_with_precision
from distlib.training.tp import apply_tensor_parallel, plan_tensor_parallel
from distlib.training.wrapped import wrapped_of

__all__ = ["FSDPWrapped", "apply", "data_mesh", "mesh_env", "plan_units", "state_dict"]


class FSDPWrapped(SingleWrapped):
    """A model sharded by FSDP2 (the module is its own root): gradients sync on ``micro.sync``."""

    def backward(self, loss: torch.Tensor, micro: MicroStep | None) -> None:
        """Backward with FSDP2's reduce-scatter on sync steps only."""
        scaled = self.scale(loss)
        self.module.set_requires_gradient_sync(micro is None or micro.sync)  # type: ignore[operator]
        scaled.backward()  # type: ignore[no-untyped-call]


def plan_units(model: torch.nn.Module, strategy: FSDP) -> list[str]:
    """Names of the submodules that become their own FSDP unit, innermost first.

    A module is a unit when its class name is in ``wrap_classes`` (``"auto"``: in the model's
    ``_no_split_modules``; an empty list there wraps only the root); with no classes given and
    ``min_num_params > 0``, when the parameters it holds outside smaller units reach
    ``min_num_params``. The root is never listed (it is always sharded last).

    Raises:
        StrategyError: ``wrap_classes`` names a class the model does not contain, or is
            ``"auto"`` for a model without ``_no_split_modules``.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        >>> plan_units(net, FSDP(min_num_params=50))
        ['0']
        >>> net._no_split_modules = ["Linear"]
        >>> plan_units(net, FSDP(wrap_classes="auto"))
        ['1', '0']
    """
    modules = dict(model.named_modules())
    classes = _wrap_classes(model, strategy)
    if strategy.wrap_classes:
        present = {type(m).__name__ for m in modules.values()}
        missing = sorted(set(classes) - present)
        if missing:
            msg = (f"wrap(): FSDP wrap_classes must name module classes in the model, but got "
                   f"{missing}, and the model has {sorted(present)}. Check the class names.")
            raise StrategyError(msg)
        return [name for name, m in reversed(modules.items())
                if name and type(m).__name__ in classes]
    if strategy.min_num_params <= 0:
        return []
    units: list[str] = []
    counted: set[int] = set()
    for name, module in reversed(modules.items()):  # children before parents
        if not name:
            continue
        own = [p for p in module.parameters() if id(p) not in counted]
        if sum(p.numel() for p in own) >= strategy.min_num_params:
            units.append(name)
            counted.update(id(p) for p in own)
    return units


def _wrap_classes(model: torch.nn.Module, strategy: FSDP) -> tuple[str, ...]:
    """The class names that become units: ``wrap_classes``, or the model's own list."""
    if strategy.wrap_classes != (AUTO,):
        return strategy.wrap_classes
    listed = getattr(model, "_no_split_modules", None)
    if listed is None:
        msg = (f"wrap(): FSDP wrap_classes='auto' must find the model's `_no_split_modules` "
               f"(transformers models carry it), but got a {type(model).__name__} without it. "
               "Name the classes, e.g. FSDP(wrap_classes=['Block']) or "
               "--fsdp-wrap-classes Block.")
        raise StrategyError(msg)
    return tuple(str(name) for name in listed)


def mesh_env(strategy: FSDP, env: Env) -> Env:
    """The Env whose mesh FSDP applies: ``hybrid_shard`` is ``dp_replicate = num_nodes``.

    Raises:
        StrategyError: ``hybrid_shard`` with a machine count that does not divide the
            ``dp_shard`` axis, or with a mesh whose ``dp_replicate`` says something else.

    Examples:
        >>> from distlib.topology import Mesh
        >>> env = Env(world_size=8, rank=0, local_world_size=4, num_nodes=2, mesh=Mesh(tp=2))
        >>> mesh_env(FSDP(hybrid_shard=True), env).mesh
        Mesh(dp_replicate=2, dp_shard=2, cp=1, tp=2)
    """
    mesh = env.mesh
    if not strategy.hybrid_shard or mesh.dp_replicate == env.num_nodes:
        return env
    if mesh.dp_replicate != 1:
        msg = (f"wrap(): FSDP(hybrid_shard=True) means dp_replicate = num_nodes, so the Env's "
               f"mesh must agree, but got num_nodes={env.num_nodes} and mesh {mesh}. Drop "
               "hybrid_shard (the mesh already says how to replicate), or make dp_replicate "
               "the number of machines.")
        raise StrategyError(msg)
    if env.num_nodes < 1 or mesh.dp_shard % env.num_nodes:
        msg = (f"wrap(): FSDP hybrid_shard must have a machine count that divides the world "
               f"size (the dp_shard axis, {mesh.dp_shard}), but got num_nodes={env.num_nodes}, "
               f"world_size={env.world_size}. Start the same number of ranks on every machine.")
        raise StrategyError(msg)
    hybrid = dataclasses.replace(mesh, dp_replicate=env.num_nodes,
                                 dp_shard=mesh.dp_shard // env.num_nodes, inferred=None)
    return dataclasses.replace(env, mesh=hybrid)


def data_mesh(env: Env, *, hybrid: bool = False) -> Any:
    """The DeviceMesh that ``fully_shard`` shards over: the data axes (and ``cp``).

    ``dp_shard`` alone; ``(dp_replicate, dp_shard)`` (HSDP) when ``dp_replicate > 1`` or
    ``hybrid`` (``FSDP(hybrid_shard=True)``: 2-D even on one machine, ``(1, ranks)``, as
    FSDP1's ``HYBRID_SHARD``). With
    ``cp > 1`` the cp ranks hold different parts of one sequence, so their gradients are
    reduced too: ``dp_shard`` and ``cp`` are flattened into one shard axis (torchtitan's
    ``dp_shard_cp``).

    Effects: builds the Env's device mesh on first use (`distlib.runtime.device_mesh`).
    """
    full = device_mesh(env)
    replicate = hybrid or env.mesh.dp_replicate > 1
    if env.mesh.cp == 1:
        return full[("dp_replicate", "dp_shard")] if replicate else full["dp_shard"]
    flat = full[("dp_shard", "cp")]._flatten("dp_shard_cp")
    if not replicate:
        return flat
    # HSDP with cp: torch (2.13) still slices a flattened axis from the root mesh, with a
    # deprecation warning; there is no other way yet to pair it with dp_replicate.
    return full[("dp_replicate", "dp_shard_cp")]


def _policies(strategy: FSDP, env: Env, *, root: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"reshard_after_forward": strategy.reshard_after_forward}
    dtype = compute_dtype(env.precision)
    if dtype is not None:
        # Only the root returns fp32: inner units hand the compute dtype to the next layer.
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=dtype, reduce_dtype=torch.float32,
            output_dtype=torch.float32 if root else None)
    if strategy.cpu_offload:
        # Pinned host memory needs an accelerator; a CPU job offloads to where it already is.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=env.torch_device.type != "cpu")
    return kwargs


def _rebind(optimizer: Any, before: dict[int, str], model: Any) -> None:
    """Point the optimizer's param groups at the sharded parameters of the same names."""
    if optimizer is None:
        return
    after = dict(model.named_parameters(remove_duplicate=False))
    for group in optimizer.param_groups:
        names = [before.get(id(p)) for p in group["params"]]
        if None in names:
            msg = ("wrap(): the optimizer must only hold the model's parameters, but got a "
                   "parameter the model does not have. Build the optimizer from "
                   "model.parameters().")
            raise StrategyError(msg)
        group["params"] = [after[n] for n in names]  # type: ignore[index]


def _broadcast_from_rank0(model: Any) -> None:
    """Give every rank rank 0's parameters and buffers (Accelerate's sync_module_states).

    Meta tensors (a model built under `init_empty_weights`) have nothing to send: every rank
    fills them later from the checkpoint (`load_checkpoint` reads each rank's shards).
    """
    with torch.no_grad():
        seen: set[int] = set()
        for tensor in [*model.parameters(), *model.buffers()]:
            if id(tensor) not in seen and not tensor.is_meta:
                seen.add(id(tensor))
                dist.broadcast(tensor.data, src=0)


def _chain_forward_prefetch(units: list[Any]) -> None:
    """Each unit, in registration (forward) order, prefetches the next one's all-gather."""
    for unit, following in itertools.pairwise(units):
        unit.set_modules_to_forward_prefetch([following])


def _check_units_for_options(model: torch.nn.Module, strategy: FSDP, units: list[str]) -> None:
    """Refuse options that act on FSDP units when the model has too few to act on.

    Activation checkpointing wraps each unit; forward prefetch chains one unit to the next.
    With no units (or one, for prefetch) they would do nothing, silently.
    """
    idle = [f"{name} (needs {least} unit{'s' if least > 1 else ''})"
            for name, least in (("activation_checkpointing", 1), ("forward_prefetch", 2))
            if getattr(strategy, name) and len(units) < least]
    if idle:
        msg = (f"wrap(): FSDP {' and '.join(idle)} acts on FSDP units, so wrap_classes or "
               f"min_num_params must name them, but got {len(units)} unit(s) in a "
               f"{type(model).__name__} (wrap_classes={strategy.wrap_classes!r}, "
               f"min_num_params={strategy.min_num_params}). Set wrap_classes to the model's "
               "repeated block (its decoder layer class, or 'auto' for a transformers model), or "
               "turn the option off.")
        raise StrategyError(msg)


def apply(model: torch.nn.Module, strategy: FSDP, env: Env, *, optimizer: Any = None,
          scheduler: Any = None, tp_plan: str | Mapping[str, Any] = "auto",
          compile: Mapping[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """Apply the Env's mesh: tensor parallel on ``tp``, then FSDP2 over the data axes.

    torchtitan's order: ``parallelize_module`` over the ``tp`` ranks (when ``tp > 1``), then
    activation checkpointing of each unit, then ``torch.compile`` of each unit in place (with
    ``compile`` options; the root when there are no units), then ``fully_shard`` of the units
    and the root over
    `data_mesh` (HSDP when ``dp_replicate > 1``). Context parallelism (``cp > 1``) acts in
    the forward (`distlib.training.cp.context_parallel`); here its ranks join the shard axis.

    Args:
        tp_plan: with ``tp > 1``, ``"auto"`` (the model's transformers plan) or a mapping
            ``{module pattern: style}`` (see `distlib.training.tp.plan_tensor_parallel`).
        compile: ``torch.compile`` options, or None not to compile.

    Returns:
        ``(model, optimizer, scheduler)``: the same module object, now an ``FSDPModule``
        whose parameters are DTensors; the passed optimizer, rebound to them (stepped through
        a ``GradScaler`` under fp16).

    Raises:
        StrategyError: no process group, an optimizer that already has state, unknown
            ``wrap_classes``, a tp_plan that cannot apply, hybrid_shard against the mesh.

    Effects: joins the process group and builds the device mesh; with ``sync_module_states``
    overwrites every rank's parameters and buffers with rank 0's; shards ``model`` in place
    (its parameters are replaced); rewrites ``optimizer.param_groups``.
    """
    initialize(env)
    if not is_initialized():
        msg = ("wrap(): FSDP must run in a joined process group, but got a one-process Env "
               "and no group. Start the script with `distlib launch` (or use Single/DDP).")
        raise StrategyError(msg)
    if optimizer is not None and len(optimizer.state) > 0:
        msg = ("wrap(): the optimizer must have no state yet under FSDP (its parameters are "
               f"replaced), but got state for {len(optimizer.state)} parameter(s). Wrap before "
               "the first optimizer step.")
        raise StrategyError(msg)
    meshed = mesh_env(strategy, env)
    plan = plan_tensor_parallel(model, tp_plan, env.mesh.tp) if env.mesh.tp > 1 else None
    units = plan_units(model, strategy)
    _check_units_for_options(model, strategy, units)
    before = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    scaler = place_with_precision(model, env, autocast=False)
    if strategy.sync_module_states:
        _broadcast_from_rank0(model)
    if plan is not None:
        apply_tensor_parallel(model, device_mesh(meshed)["tp"], plan)
    mesh = data_mesh(meshed, hybrid=strategy.hybrid_shard)
    modules = dict(model.named_modules())
    for name in units:
        if strategy.activation_checkpointing:
            checkpoint(modules[name])
        if compile is not None:
            modules[name].compile(**compile)
        fully_shard(modules[name], mesh=mesh,  # type: ignore[call-overload]
                    **_policies(strategy, env, root=False))
    if compile is not None and not units:
        model.compile(**compile)
    fully_shard(model, mesh=mesh, **_policies(strategy, env, root=True))
    if strategy.forward_prefetch:
        _chain_forward_prefetch([modules[name] for name in reversed(units)])
    _rebind(optimizer, before, model)
    wrapped = FSDPWrapped(strategy=strategy, env=env, module=model, scaler=scaler)
    return wrapped.attach(optimizer, scheduler)


def state_dict(model: Any) -> dict[str, Any]:
    """The model's state dict as the strategy's ``state_dict_type`` says.

    ``"full"``: whole tensors, gathered on every rank and moved to the CPU; ``"sharded"``:
    each rank's DTensor shards (for ``torch.distributed.checkpoint``).

    Effects: ``"full"`` runs all-gathers across the ranks.
    """
    wrapped = wrapped_of(model)
    full = wrapped is not None and getattr(wrapped.strategy, "state_dict_type", "") == "full"
    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    return get_model_state_dict(model, options=options)
