"""The `DeepSpeed` applier: ``deepspeed.initialize`` with ZeRO, and the engine's Wrapped.

DeepSpeed's engine does its own accumulation boundary, loss scaling, clipping and checkpoints;
`DeepSpeedWrapped` hands each of those to it. ``deepspeed`` is imported only when a model is
wrapped or released (an optional backend).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import torch

from distlib.env import Env
from distlib.errors import ConfigError, StrategyError
from distlib.precision import AutocastForward, check_supported, compute_dtype
from distlib.runtime import initialize, is_initialized
from distlib.strategies.deepspeed import DeepSpeed
from distlib.training.accumulation import MicroStep
from distlib.training.optimizers import DelegatingOptimizer
from distlib.training.single import SingleWrapped

__all__ = ["DeepSpeedWrapped", "EngineOptimizer", "apply", "plan_config"]


def _load_config(config: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    try:
        with open(config, encoding="utf-8") as f:
            loaded = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        msg = (f"wrap(): DeepSpeed config must be a readable JSON file, but got {config!r} "
               f"({exc}). Pass a dict or the path of a DeepSpeed JSON config.")
        raise ConfigError(msg) from exc
    if not isinstance(loaded, dict):
        msg = f"wrap(): DeepSpeed config must hold a JSON object, but got {type(loaded).__name__}."
        raise ConfigError(msg)
    return loaded


def _pick(config: dict[str, Any], key: str, ours: Any, default: Any) -> Any:
    """Our value where the config has none or "auto"; an error where the two disagree."""
    theirs = config.get(key, "auto")
    if theirs == "auto":
        return default if ours is None else ours
    if ours is not None and ours != theirs:
        msg = (f"wrap(): DeepSpeed {key} must agree with the config file, but got {ours!r} from "
               f"the strategy and {theirs!r} in the config. Set it in one place, or 'auto'.")
        raise ConfigError(msg)
    return theirs


def _precision_blocks(config: dict[str, Any], precision: str) -> None:
    for key in ("fp16", "bf16"):
        block = dict(config.get(key) or {})
        enabled = block.get("enabled", "auto")
        wanted = precision == key
        if enabled != "auto" and bool(enabled) != wanted:
            msg = (f"wrap(): the DeepSpeed config's {key}.enabled must agree with the Env's "
                   f"precision, but got {key}.enabled={enabled!r} and precision={precision!r}. "
                   "Choose the precision with --precision (or Env.precision) and set 'auto'.")
            raise ConfigError(msg)
        block["enabled"] = wanted
        config[key] = block


def plan_config(strategy: DeepSpeed, env: Env, *, has_optimizer: bool) -> dict[str, Any]:
    """The DeepSpeed config for this strategy and Env, "auto" and absent fields filled in.

    Accumulation steps, clipping, ZeRO stage, offload and precision come from the strategy and
    the Env, so they never disagree with the config; the micro-batch size, which DeepSpeed
    only logs here, defaults to 1.

    Raises:
        ConfigError: the config contradicts the strategy or the Env.

    Examples:
        >>> cfg = plan_config(DeepSpeed(zero_stage=3), Env(precision="bf16"), has_optimizer=True)
        >>> cfg["zero_optimization"]["stage"], cfg["bf16"]["enabled"], cfg["train_batch_size"]
        (3, True, 1)
    """
    config = _load_config(strategy.config)
    gas = _pick(config, "gradient_accumulation_steps", strategy.gradient_accumulation_steps, 1)
    micro = config.get("train_micro_batch_size_per_gpu", "auto")
    micro = 1 if micro == "auto" else micro
    config["gradient_accumulation_steps"] = gas
    config["train_micro_batch_size_per_gpu"] = micro
    config["train_batch_size"] = micro * gas * env.world_size
    config["gradient_clipping"] = _pick(config, "gradient_clipping", strategy.gradient_clipping,
                                        0.0)
    zero = dict(config.get("zero_optimization") or {})
    zero.setdefault("stage", strategy.zero_stage)
    for key in ("offload_optimizer", "offload_param"):
        device = getattr(strategy, key)
        if device != "none":
            zero[key] = {**dict(zero.get(key) or {}), "device": device}
        path = getattr(strategy, f"{key}_nvme_path")
        if path is not None:
            zero[key] = {**dict(zero.get(key) or {}), "nvme_path": path}
    if strategy.gather_16bit_weights_on_save is not None:
        zero["stage3_gather_16bit_weights_on_model_save"] = strategy.gather_16bit_weights_on_save
    if "offload_param" in zero and zero["stage"] != 3:
        msg = (f"wrap(): DeepSpeed offload_param must come with ZeRO stage 3, but got stage "
               f"{zero['stage']}. Use zero_stage=3 or offload_optimizer only.")
        raise ConfigError(msg)
    config["zero_optimization"] = zero
    _precision_blocks(config, str(env.precision))
    if has_optimizer:
        config.setdefault("zero_allow_untested_optimizer", True)
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("steps_per_print", 2**31 - 1)
    return config


class EngineOptimizer(DelegatingOptimizer):
    """The optimizer of a DeepSpeed engine, driven through the engine.

    ``step()`` is ``engine.step()`` (which clips, steps and zeroes the gradients at the
    accumulation boundary), ``zero_grad()`` is ``engine.zero_grad()``. ``skipped_steps``
    is the engine's count of fp16 overflow steps.
    """

    _OWN = ("optimizer", "engine", "__setstate__")

    def __init__(self, engine: Any) -> None:
        super().__init__(engine.optimizer)
        self.engine = engine

    @property
    def skipped_steps(self) -> int:
        return int(self.engine.skipped_steps)

    @property
    def num_updates(self) -> int:
        """The updates applied to the weights: boundary steps minus fp16 overflow skips."""
        return int(self.engine.global_steps) - int(self.engine.skipped_steps)

    @property
    def step_was_skipped(self) -> bool:
        """True when the engine's last step found an fp16 overflow and left the weights."""
        return bool(getattr(self.engine.optimizer, "overflow", False))

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.engine.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()


class DeepSpeedWrapped(SingleWrapped):
    """A DeepSpeed engine: it does backward, clipping and its own checkpoints.

    Attributes:
        engine: the ``DeepSpeedEngine`` (what ``wrap`` returned); None once released.
    """

    saves_itself = True

    def __init__(self, *, strategy: DeepSpeed, env: Env, engine: Any) -> None:
        super().__init__(strategy=strategy, env=env, module=engine.module, wrapper=engine)
        self.engine = engine

    def backward(self, loss: torch.Tensor, micro: MicroStep | None) -> None:
        """The engine's backward; its accumulation boundary is ``micro.sync``."""
        self.engine.set_gradient_accumulation_boundary(micro is None or micro.sync)
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float, norm_type: float) -> torch.Tensor | None:
        """Set the engine's clipping to ``max_norm`` (it clips inside its step); None."""
        self.engine._config.gradient_clipping = float(max_norm)
        if hasattr(self.engine.optimizer, "clip_grad"):
            self.engine.optimizer.clip_grad = float(max_norm)
        return None

    def full_state(self) -> dict[str, torch.Tensor]:
        """The module's state on the main rank's CPU; ZeRO-3 partitions gathered first."""
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(
                params, modifier_rank=None, enabled=self.engine.zero_optimization_stage() == 3):
            state = {k: v.detach().to("cpu", copy=True)
                     for k, v in self.module.state_dict().items()}
        return state if self.env.is_main else {}

    def save_checkpoint(self, folder: pathlib.Path) -> None:
        """``engine.save_checkpoint(folder, tag="state")`` (collective)."""
        self.engine.save_checkpoint(str(folder), tag="state")

    def load_checkpoint(self, folder: pathlib.Path) -> bool:
        """``engine.load_checkpoint(folder, tag="state")``; True if DeepSpeed found one."""
        loaded, _ = self.engine.load_checkpoint(str(folder), tag="state")
        return loaded is not None

    def release(self) -> None:
        """Destroy the engine (once) and free ZeRO-3's module-level references to it.

        Effects: ``engine.destroy()``; edits DeepSpeed's forward stack and method caches;
        then what `SingleWrapped.release` does.
        """
        engine, self.engine = self.engine, None
        if engine is not None:
            _leave_zero3_stack(engine)
            engine.destroy()
            _clear_zero3_caches()
        super().release()


def _leave_zero3_stack(engine: Any) -> None:
    """Take the engine's modules off ZeRO-3's module-level forward stack.

    DeepSpeed (0.19) pushes a module on ``parameter_offload.FWD_MODULE_STACK`` in its forward
    pre-hook and can leave the root there after the forward; that global list then keeps the
    whole model alive after ``engine.destroy()`` (found by `free_memory`'s test).
    """
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    stack = getattr(offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list) and stack:
        mine = {id(m) for m in engine.module.modules()}
        stack[:] = [m for m in stack if id(m) not in mine]


def _lru_caches(value: Any, depth: int = 0) -> list[Any]:
    """The ``functools.lru_cache`` wrappers in ``value`` or in its closure (decorators)."""
    if hasattr(value, "cache_clear"):
        return [value]
    found: list[Any] = []
    for cell in (getattr(value, "__closure__", None) or ()) if depth < 3 else ():
        with contextlib.suppress(ValueError):  # an empty cell
            found += _lru_caches(cell.cell_contents, depth + 1)
    return found


def _clear_zero3_caches() -> None:
    """Empty the method caches of ZeRO-3's parameter coordinator.

    DeepSpeed (0.19) decorates a ``PartitionedParameterCoordinator`` method with a class-level
    ``functools.lru_cache`` keyed by ``(coordinator, submodule, step)``: it keeps every
    engine's coordinator and submodules alive for the life of the process. Emptying it costs
    other live engines one recomputation per key, nothing else.
    """
    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    cls = getattr(coordinator, "PartitionedParameterCoordinator", None)
    for value in vars(cls).values() if cls is not None else ():
        for cache in _lru_caches(value):
            cache.cache_clear()


def apply(model: torch.nn.Module, strategy: DeepSpeed, env: Env, *, optimizer: Any = None,
          scheduler: Any = None) -> tuple[Any, Any, Any]:
    """Build a DeepSpeed engine for the model (one engine per call, so per model).

    Returns:
        ``(engine, optimizer, scheduler)``: the engine runs forward (floating inputs cast to
        the engine's dtype, outputs in fp32); the optimizer's ``step`` is ``engine.step``;
        the scheduler is the user's, unchanged (it sets the learning rate DeepSpeed uses).

    Raises:
        StrategyError: no process group, or no LOCAL_RANK (DeepSpeed reads it itself).

    Effects: joins the process group; DeepSpeed moves, casts and partitions the model's
    parameters in place.
    """
    initialize(env)
    check_supported(env.precision, env.device)
    if not is_initialized() or "LOCAL_RANK" not in os.environ:
        msg = ("wrap(): DeepSpeed must run in a process group with LOCAL_RANK set (DeepSpeed "
               f"reads it), but got group joined={is_initialized()}, LOCAL_RANK="
               f"{os.environ.get('LOCAL_RANK')!r}. Start the script with `distlib launch`.")
        raise StrategyError(msg)
    config = plan_config(strategy, env, has_optimizer=optimizer is not None)
    import deepspeed

    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, dist_init_required=False)
    dtype = compute_dtype(env.precision)
    if dtype is not None:
        engine.forward = AutocastForward(engine.forward, env.torch_device.type, dtype,
                                         cast_inputs=True)
    wrapped = DeepSpeedWrapped(strategy=strategy, env=env, engine=engine)
    view = EngineOptimizer(engine) if ds_optimizer is not None else None
    return wrapped.attach(view, scheduler)
