"""`wrap` and `unwrap`: apply a strategy value through its applier, and undo the wrappers.

`wrap` picks the applier from an explicit, read-only table keyed by the strategy value's type
(`Single` -> ``single.apply``, ...); a user's own strategy value brings its own ``apply``
method. Nothing is registered globally.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal, overload

import torch

from distlib.env import Env, detect
from distlib.errors import ConfigError, StrategyError
from distlib.strategies.base import Strategy, parse_strategy
from distlib.strategies.ddp import DDP
from distlib.strategies.deepspeed import DeepSpeed
from distlib.strategies.fsdp import FSDP
from distlib.strategies.single import Single
from distlib.strategies.xla import XLA
from distlib.training import ddp, deepspeed, fsdp, single, xla
from distlib.training.cp import check_cp
from distlib.training.plan import check_parallelism
from distlib.training.scheduler import SCHEDULER_STEPS, AccelerateScheduler
from distlib.training.tp import AUTO_PLAN, plan_tensor_parallel
from distlib.training.wrapped import wrapped_of

__all__ = ["unwrap", "wrap"]

Applier = Callable[..., tuple[Any, Any, Any]]

# strategy value type -> its applier: apply(model, strategy, env, *, optimizer, scheduler).
_APPLIERS: Mapping[type, Applier] = MappingProxyType({
    Single: single.apply,
    DDP: ddp.apply,
    FSDP: fsdp.apply,
    DeepSpeed: deepspeed.apply,
    XLA: xla.apply,
})


def _resolve(env_or_strategy: Env | Strategy | str | None, env: Env | None) -> tuple[Strategy, Env]:
    if isinstance(env_or_strategy, Env):
        if env is not None:
            msg = ("wrap(): env must be passed once, but got an Env both as the second argument "
                   "and as env=. Pass wrap(model, env), or wrap(model, strategy, env=env).")
            raise StrategyError(msg)
        return env_or_strategy.strategy, env_or_strategy
    if env is None:
        env = detect()
    if env_or_strategy is None:
        return env.strategy, env
    if isinstance(env_or_strategy, str):
        return parse_strategy(env_or_strategy, source="wrap(): strategy"), env
    if isinstance(env_or_strategy, Strategy):
        return env_or_strategy, env
    msg = (f"wrap(): env_or_strategy must be an Env, a strategy value or a strategy name, but got "
           f"{env_or_strategy!r}. Use wrap(model, env) or wrap(model, dl.DDP(), env=env).")
    raise StrategyError(msg)


def _apply(model: Any, strategy: Strategy, env: Env, optimizer: Any,
           scheduler: Any, tp_plan: str | Mapping[str, Any],
           compile_options: dict[str, Any] | None) -> tuple[Any, Any, Any]:
    """Run the strategy's own ``apply`` method, else the built-in applier of its type."""
    own = getattr(strategy, "apply", None)
    if callable(own):
        out = own(model, env, optimizer=optimizer, scheduler=scheduler)
    else:
        builtin = next((_APPLIERS[cls] for cls in type(strategy).__mro__ if cls in _APPLIERS),
                       None)
        if builtin is None:
            msg = (f"wrap(): strategy {strategy.name!r} must have an apply function (a built-in "
                   f"applier, or its own apply(model, env, *, optimizer, scheduler) method), but "
                   f"got a {type(strategy).__name__} with neither. Give the value an apply "
                   "method that returns (model, optimizer, scheduler) with a Wrapped attached "
                   "to the model (distlib.training.attach).")
            raise StrategyError(msg)
        extra: dict[str, Any] = {"tp_plan": tp_plan} if env.mesh.tp > 1 else {}
        if compile_options is not None and isinstance(strategy, FSDP):
            extra["compile"] = compile_options  # each unit, before fully_shard (torchtitan's order)
        out = builtin(model, strategy, env, optimizer=optimizer, scheduler=scheduler, **extra)
    if not (isinstance(out, tuple) and len(out) == 3) or wrapped_of(out[0]) is None:
        msg = (f"wrap(): strategy {strategy.name!r}'s apply must return (model, optimizer, "
               f"scheduler) with a Wrapped attached to the model, but got {out!r:.200}. End "
               "apply with `return distlib.training.attach(model, wrapped), optimizer, "
               "scheduler`.")
        raise StrategyError(msg)
    return out


# Why a built-in strategy cannot take a tp or cp axis, and what to do instead.
_NO_MODEL_PARALLEL: Mapping[type, str] = MappingProxyType({
    DDP: ("DDP replicates the whole model on every rank. Use dl.FSDP() (with dp_shard=1 and "
          "dp_replicate=N for replicas of a tensor-parallel model, or dp_shard=1 alone for "
          "pure TP)"),
    DeepSpeed: ("DeepSpeed's engine partitions the model itself and cannot compose with torch's "
                "tensor or context parallelism. Use dl.FSDP() for N-D parallelism, or a mesh "
                "with tp=1 and cp=1 for DeepSpeed"),
    XLA: ("distlib's XLA strategy runs data parallel replicas only (torch_xla shards with "
          "its own SPMD API). Use a mesh with tp=1 and cp=1 on XLA"),
    Single: ("Single runs one replica in one process. Use dl.FSDP() in a launched job"),
})


def _check_mesh(model: Any, strategy: Strategy, env: Env,
                tp_plan: str | Mapping[str, Any]) -> None:
    """Refuse, before anything starts, a mesh or tp_plan that the strategy cannot honour."""
    mesh = env.mesh
    if not isinstance(strategy, FSDP) and not (mesh.tp == 1 and mesh.cp == 1):
        why = next((text for cls, text in _NO_MODEL_PARALLEL.items()
                    if isinstance(strategy, cls)), None)
        if why is not None:
            msg = (f"wrap(): strategy {strategy.name!r} must run on a data-parallel mesh "
                   f"(tp=1, cp=1), but got mesh {mesh}. {why}.")
            raise StrategyError(msg)
    if not isinstance(tp_plan, str) or tp_plan != AUTO_PLAN:
        if mesh.tp == 1:
            msg = (f"wrap(): tp_plan must come with a tensor-parallel mesh (tp > 1), but got "
                   f"tp_plan={tp_plan!r:.120} with mesh {mesh}. Set the tp axis (Mesh(tp=2), "
                   "--tp-size 2), or drop tp_plan.")
            raise StrategyError(msg)
        if not isinstance(strategy, FSDP):
            msg = (f"wrap(): tp_plan must come with the FSDP strategy (its applier splits the "
                   f"model), but got strategy {strategy.name!r}. Apply the plan in the "
                   "strategy's own apply, or use dl.FSDP().")
            raise StrategyError(msg)
    check_cp(env)
    if mesh.tp > 1 and isinstance(strategy, FSDP):
        plan_tensor_parallel(model, tp_plan, mesh.tp)
        # The same divisibility rules `distlib plan --mesh` reports (heads, kv heads, widths).
        check_parallelism(model, mesh, tp_plan=tp_plan, world_size=env.world_size)


_COMPILE_KEYS = ("backend", "mode", "fullgraph", "dynamic", "options")


def _compile_options(compile: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments for ``compile=`` (None: do not compile)."""
    if not compile:
        return None
    options = {} if compile is True else dict(compile)  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(_COMPILE_KEYS))
    if unknown:
        msg = (f"wrap(): compile must only have the keys {', '.join(_COMPILE_KEYS)}, but got "
               f"{unknown}. E.g. compile={{'backend': 'inductor', 'mode': 'max-autotune'}}.")
        raise StrategyError(msg)
    return options


def _check_scheduler_steps(scheduler_steps: object, split_batches: object, optimizer: Any,
                           scheduler: Any) -> None:
    if scheduler_steps not in SCHEDULER_STEPS:
        msg = (f"wrap(): scheduler_steps must be one of {', '.join(map(repr, SCHEDULER_STEPS))}, "
               f"but got {scheduler_steps!r}. Use 'accelerate' to step the scheduler as "
               "Accelerate does (world size times per call), 'once' for one step per call.")
        raise ConfigError(msg)
    if not isinstance(split_batches, bool):
        msg = (f"wrap(): split_batches must be a bool, but got {split_batches!r}. Pass the "
               "value given to dl.shard(..., split_batches=...).")
        raise ConfigError(msg)
    if scheduler_steps == "once":
        if split_batches:
            msg = ("wrap(): split_batches must come with scheduler_steps='accelerate' (it only "
                   "sets how many times that scheduler steps), but got split_batches=True with "
                   "scheduler_steps='once'. Drop it, or pass scheduler_steps='accelerate'.")
            raise ConfigError(msg)
        return
    if scheduler is None or optimizer is None:
        missing = "scheduler" if scheduler is None else "optimizer"
        msg = (f"wrap(): scheduler_steps='accelerate' must come with a scheduler and its "
               f"optimizer, but got {missing}=None. Pass wrap(model, env, optimizer=opt, "
               "scheduler=sched, scheduler_steps='accelerate').")
        raise ConfigError(msg)


@overload
def wrap(model: torch.nn.Module, env_or_strategy: Env | Strategy | str | None = None, *,
         optimizer: None = None, scheduler: None = None, env: Env | None = None,
         tp_plan: str | Mapping[str, Any] = "auto", compile: bool | Mapping[str, Any] = False,
         scheduler_steps: Literal["once", "accelerate"] = "once",
         split_batches: bool = False) -> Any: ...


@overload
def wrap(model: torch.nn.Module, env_or_strategy: Env | Strategy | str | None = None, *,
         optimizer: Any, scheduler: None = None, env: Env | None = None,
         tp_plan: str | Mapping[str, Any] = "auto", compile: bool | Mapping[str, Any] = False,
         scheduler_steps: Literal["once", "accelerate"] = "once",
         split_batches: bool = False) -> tuple[Any, Any]: ...


@overload
def wrap(model: torch.nn.Module, env_or_strategy: Env | Strategy | str | None = None, *,
         optimizer: Any = None, scheduler: Any, env: Env | None = None,
         tp_plan: str | Mapping[str, Any] = "auto", compile: bool | Mapping[str, Any] = False,
         scheduler_steps: Literal["once", "accelerate"] = "once",
         split_batches: bool = False) -> tuple[Any, Any, Any]: ...


def wrap(model: torch.nn.Module, env_or_strategy: Env | Strategy | str | None = None, *,
         optimizer: Any = None, scheduler: Any = None, env: Env | None = None,
         tp_plan: str | Mapping[str, Any] = "auto", compile: bool | Mapping[str, Any] = False,
         scheduler_steps: Literal["once", "accelerate"] = "once",
         split_batches: bool = False) -> Any:
    """Apply a strategy and a precision to a model (and its optimizer and scheduler).

    The strategy is ``env.strategy`` for ``wrap(model, env)``; an explicit strategy value
    overrides it (``wrap(model, dl.FSDP(), env=env)``; without ``env=`` it comes from
    `detect()`). What the wrapped model needs later — its grad scaler, its DeepSpeed
    engine — is kept on the returned model, so several models can be wrapped independently.

    Args:
        model: the user's ``nn.Module``.
        env_or_strategy: an `Env`, or a strategy value / name (then ``env=`` gives the Env).
            A user's own strategy value (a frozen value with a ``name`` ClassVar, see
            `Strategy`) works when it has an ``apply(model, env, *, optimizer, scheduler)``
            method returning ``(model, optimizer, scheduler)`` with a `Wrapped` attached to
            the model (`distlib.training.attach`).
        optimizer: the model's optimizer; FSDP2 rebinds it to the sharded parameters,
            DeepSpeed drives it through its engine, fp16 steps it through a ``GradScaler``.
        scheduler: the learning-rate scheduler, returned unchanged beside the optimizer
            (or inside an `AccelerateScheduler`, see ``scheduler_steps``).
        env: the Env when ``env_or_strategy`` is a strategy.
        tp_plan: with a tensor-parallel mesh (``env.mesh.tp > 1``, strategy FSDP), which
            submodules to split: ``"auto"`` (default) reads a transformers model's own plan
            (``model._tp_plan``, else ``config.base_model_tp_plan``); a mapping
            ``{module name pattern: "colwise" | "rowwise" | ... | a torch ParallelStyle}``
            serves any model (fnmatch patterns over ``named_modules()``; see
            `distlib.training.tp.plan_tensor_parallel`). The mesh is applied in torchtitan's
            order: tensor parallel, then FSDP2 over the data axes (HSDP when
            ``dp_replicate > 1``); ``cp > 1`` (CUDA only) splits sequences in
            ``dl.context_parallel``.
        compile: ``True`` or ``torch.compile`` options (``backend``, ``mode``,
            ``fullgraph``, ``dynamic``, ``options``). Under FSDP each unit (block) is compiled
            in place after tensor parallelism and activation checkpointing and before
            ``fully_shard`` (torchtitan's order; the root too when there are no units), and
            the FSDP module itself is returned; otherwise the wrapped model is compiled.
        scheduler_steps: ``"once"`` (default): ``scheduler.step()`` is the user's scheduler's
            own, one step per call, so a schedule counts optimizer steps, whatever the number
            of processes. ``"accelerate"``: step as Accelerate's prepared scheduler does, for
            a schedule sized in batches of the unsharded loader: ``env.world_size`` steps per
            call, none when the optimizer did not update the weights since the last call
            (fp16 overflow, a micro-step without ``optimizer.step()``).
        split_batches: with ``scheduler_steps="accelerate"``, the loaders split each batch
            across ranks (``dl.shard(..., split_batches=True)``): one step per call.

    Returns:
        The wrapped model alone, or ``(model, optimizer)``, or
        ``(model, optimizer, scheduler)`` when a scheduler is passed.

    Raises:
        StrategyError: the strategy cannot apply here (no process group for FSDP2, an
            optimizer that already holds state, a model wrapped twice, a strategy value with
            no applier, a tp or cp axis under DDP, DeepSpeed, XLA or Single, a tp_plan that
            names no module or an unknown style, heads that the tp size does not divide,
            cp > 1 off CUDA, ...).
        PrecisionError: the hardware cannot run the Env's precision.
        ConfigError: an unknown ``scheduler_steps``, or ``"accelerate"`` without a scheduler
            and optimizer.

    Effects: joins the process group on first need (`distlib.runtime.initialize`); moves the
    model to the Env's device and may modify it in place (autocast forward, FSDP2 sharding).

    Examples:
        >>> import torch, distlib as dl
        >>> model = dl.wrap(torch.nn.Linear(2, 2), dl.Env(precision="bf16"))
        >>> model(torch.ones(1, 2)).dtype
        torch.float32
    """
    _check_scheduler_steps(scheduler_steps, split_batches, optimizer, scheduler)
    strategy, env = _resolve(env_or_strategy, env)
    if wrapped_of(model) is not None:
        msg = (f"wrap(): model must not be wrapped already, but got a model wrapped with "
               f"{wrapped_of(model)!r}. Wrap the original module once (see dl.unwrap).")
        raise StrategyError(msg)
    _check_mesh(model, strategy, env, tp_plan)
    options = _compile_options(compile)
    model_out, optimizer_out, scheduler_out = _apply(model, strategy, env, optimizer, scheduler,
                                                     tp_plan, options)
    if options is not None and not isinstance(strategy, FSDP):
        model_out = torch.compile(model_out, **options)
    if scheduler_steps == "accelerate":
        scheduler_out = AccelerateScheduler.for_env(scheduler_out, optimizer_out, env,
                                                    split_batches=split_batches)
    if scheduler is not None:
        return model_out, optimizer_out, scheduler_out
    if optimizer is not None:
        return model_out, optimizer_out
    return model_out


def unwrap(model: Any) -> Any:
    """Return the user's module inside a wrapped (compiled, DDP, DeepSpeed) model.

    Examples:
        >>> import torch, distlib as dl
        >>> inner = torch.nn.Linear(2, 2)
        >>> dl.unwrap(dl.wrap(inner, dl.Env())) is inner
        True
    """
    wrapped = wrapped_of(model)
    if wrapped is not None:
        return wrapped.module
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine"):
            model = model.module
        else:
            return model
