"""The `Strategy` protocol, the name <-> value mapping, and `wrap` / `unwrap`.

Strategy values are frozen, hashable and torch-free; the code that applies them lives beside
each value (``single.py``, ``ddp.py``, ...) and imports torch only when called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from distlib.errors import ConfigError, StrategyError

__all__ = [
    "STRATEGY_NAMES", "Strategy", "parse_strategy", "strategy_options", "unwrap", "wrap",
]


@runtime_checkable
class Strategy(Protocol):
    """What every strategy value has: a stable lowercase ``name``."""

    name: ClassVar[str]


def _classes() -> dict[str, type]:
    from distlib.strategies.ddp import DDP
    from distlib.strategies.deepspeed import DeepSpeed
    from distlib.strategies.fsdp import FSDP
    from distlib.strategies.single import Single
    from distlib.strategies.xla import XLA

    return {cls.name: cls for cls in (Single, DDP, FSDP, DeepSpeed, XLA)}


STRATEGY_NAMES = ("single", "ddp", "fsdp", "deepspeed", "xla")


def parse_strategy(
    value: object, options: Mapping[str, Any] | None = None, *, source: str = "strategy"
) -> Strategy:
    """Build a strategy value from a name (or pass a value through).

    Args:
        value: a strategy value, or one of ``"single"``, ``"ddp"``, ``"fsdp"``,
            ``"deepspeed"``, ``"xla"`` (any case).
        options: keyword options for the strategy, e.g. ``{"zero_stage": 3}``.
        source: the name of the input, quoted in errors.

    Returns:
        The strategy value.

    Raises:
        ConfigError: unknown name, unknown option or an option of the wrong type.

    Examples:
        >>> parse_strategy("ddp", {"static_graph": True})
        DDP(find_unused_parameters=False, bucket_cap_mb=None, static_graph=True, ...)
    """
    classes = _classes()
    if isinstance(value, tuple(classes.values())):
        if options:
            return dataclasses.replace(value, **dict(options))  # type: ignore[type-var,return-value]
        return value  # type: ignore[return-value]
    name = str(value).strip().lower() if isinstance(value, str) else None
    if name not in classes:
        msg = (
            f"{source} must be one of {', '.join(map(repr, STRATEGY_NAMES))}, but got "
            f"{value!r}. Pick the strategy by name, e.g. --strategy ddp."
        )
        raise ConfigError(msg)
    cls = classes[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options or {}) - fields)
    if unknown:
        msg = (
            f"{source}: option(s) {', '.join(map(repr, unknown))} do not exist for strategy "
            f"{name!r}, which takes {', '.join(map(repr, sorted(fields))) or 'no options'}. "
            "Check the spelling or the strategy name."
        )
        raise ConfigError(msg)
    try:
        return cls(**dict(options or {}))  # type: ignore[no-any-return]
    except (TypeError, ValueError) as exc:
        msg = f"{source}: invalid options for strategy {name!r}: {exc}"
        raise ConfigError(msg) from exc


def strategy_options(strategy: Strategy) -> dict[str, Any]:
    """Return the options of a strategy value that differ from its defaults.

    Examples:
        >>> from distlib.strategies.fsdp import FSDP
        >>> strategy_options(FSDP(cpu_offload=True))
        {'cpu_offload': True}
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(strategy):  # type: ignore[arg-type]
        value = getattr(strategy, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if value != default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _resolve(env_or_strategy: Any, env: Any) -> tuple[Strategy, Any]:
    from distlib.env import Env, detect

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
    if isinstance(env_or_strategy, str) or type(env_or_strategy).__module__.startswith(
            "distlib.strategies"):
        return parse_strategy(env_or_strategy, source="wrap(): strategy"), env
    msg = (f"wrap(): env_or_strategy must be an Env, a strategy value or a strategy name, but got "
           f"{env_or_strategy!r}. Use wrap(model, env) or wrap(model, dl.DDP(), env=env).")
    raise StrategyError(msg)


_COMPILE_KEYS = ("backend", "mode", "fullgraph", "dynamic", "options")


def _compile(model: Any, compile: bool | Mapping[str, Any]) -> Any:
    import torch

    options = {} if compile is True else dict(compile)  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(_COMPILE_KEYS))
    if unknown:
        msg = (f"wrap(): compile must only have the keys {', '.join(_COMPILE_KEYS)}, but got "
               f"{unknown}. E.g. compile={{'backend': 'inductor', 'mode': 'max-autotune'}}.")
        raise StrategyError(msg)
    return torch.compile(model, **options)


def _check_scheduler_steps(scheduler_steps: object, split_batches: object, optimizer: Any,
                           scheduler: Any) -> None:
    from distlib.strategies._handle import SCHEDULER_STEPS

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


def wrap(model: Any, env_or_strategy: Any = None, *, optimizer: Any = None,
         scheduler: Any = None, env: Any = None,
         compile: bool | Mapping[str, Any] = False,
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
        optimizer: the model's optimizer; FSDP2 rebinds it to the sharded parameters,
            DeepSpeed drives it through its engine, fp16 steps it through a ``GradScaler``.
        scheduler: the learning-rate scheduler, returned unchanged beside the optimizer
            (or inside an `AccelerateScheduler`, see ``scheduler_steps``).
        env: the Env when ``env_or_strategy`` is a strategy.
        compile: ``True`` or ``torch.compile`` options (``backend``, ``mode``,
            ``fullgraph``, ``dynamic``, ``options``) to compile the wrapped model.
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
            optimizer that already holds state, a model wrapped twice, ...).
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
    import importlib

    from distlib.strategies._handle import handle_of

    _check_scheduler_steps(scheduler_steps, split_batches, optimizer, scheduler)
    strategy, env = _resolve(env_or_strategy, env)
    if handle_of(model) is not None:
        msg = (f"wrap(): model must not be wrapped already, but got a model wrapped with "
               f"{handle_of(model)!r}. Wrap the original module once (see dl.unwrap).")
        raise StrategyError(msg)
    module = importlib.import_module(f"distlib.strategies.{strategy.name}")
    apply = getattr(module, "apply", None)
    if apply is None:
        msg = (f"wrap(): strategy {strategy.name!r} must have an apply function, but got none "
               f"in distlib.strategies.{strategy.name}. This strategy is not available yet.")
        raise StrategyError(msg)
    model, optimizer_out, scheduler_out = apply(
        model, strategy, env, optimizer=optimizer, scheduler=scheduler)
    if compile:
        model = _compile(model, compile)
    if scheduler_steps == "accelerate":
        from distlib.strategies._handle import AccelerateScheduler

        scheduler_out = AccelerateScheduler.for_env(scheduler_out, optimizer_out, env,
                                                    split_batches=split_batches)
    if scheduler is not None:
        return model, optimizer_out, scheduler_out
    if optimizer is not None:
        return model, optimizer_out
    return model


def unwrap(model: Any) -> Any:
    """Return the user's module inside a wrapped (compiled, DDP, DeepSpeed) model.

    Examples:
        >>> import torch, distlib as dl
        >>> inner = torch.nn.Linear(2, 2)
        >>> dl.unwrap(dl.wrap(inner, dl.Env())) is inner
        True
    """
    from distlib.strategies._handle import handle_of

    handle = handle_of(model)
    if handle is not None:
        return handle.module
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine"):
            model = model.module
        else:
            return model
