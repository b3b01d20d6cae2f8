"""The `DeepSpeed` strategy: ``deepspeed.initialize`` with ZeRO stages 0-3."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from distlib.errors import ConfigError, StrategyError
from distlib.strategies._validate import check_choice, check_min, check_type

__all__ = ["DeepSpeed", "apply", "plan_config"]

OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeepSpeed:
    """DeepSpeed's engine with ZeRO.

    Args:
        zero_stage: 0, 1, 2 or 3 (ignored where ``config`` sets it).
        config: a DeepSpeed config as a dict or the path of a JSON file; distlib fills in
            batch sizes, accumulation, clipping and precision where they are ``"auto"`` or absent.
        offload_optimizer: ``"none"``, ``"cpu"`` or ``"nvme"``.
        offload_param: ``"none"``, ``"cpu"`` or ``"nvme"`` (ZeRO-3 only).
        gradient_accumulation_steps: micro-steps per optimizer step (None: from the config, else 1).
        gradient_clipping: max gradient norm applied inside DeepSpeed's step (None: off).
        offload_optimizer_nvme_path: the folder for optimizer states under
            ``offload_optimizer="nvme"``.
        offload_param_nvme_path: the folder for parameters under ``offload_param="nvme"``.
        gather_16bit_weights_on_save: under ZeRO-3, gather the 16-bit weights when DeepSpeed
            saves the model (its ``stage3_gather_16bit_weights_on_model_save``; None: the
            config's value).

    Examples:
        >>> DeepSpeed(zero_stage=3).zero_stage
        3
    """

    name: ClassVar[str] = "deepspeed"
    zero_stage: int = 2
    config: str | Mapping[str, Any] | None = field(default=None, hash=False)
    offload_optimizer: str = "none"
    offload_param: str = "none"
    gradient_accumulation_steps: int | None = None
    gradient_clipping: float | None = None
    offload_optimizer_nvme_path: str | None = None
    offload_param_nvme_path: str | None = None
    gather_16bit_weights_on_save: bool | None = None

    def __post_init__(self) -> None:
        check_choice("DeepSpeed", "zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_choice("DeepSpeed", "offload_optimizer", self.offload_optimizer, OFFLOAD_DEVICES)
        check_choice("DeepSpeed", "offload_param", self.offload_param, OFFLOAD_DEVICES)
        if self.config is not None:
            check_type("DeepSpeed", "config", self.config, (str, Mapping))
        if self.gradient_accumulation_steps is not None:
            check_type("DeepSpeed", "gradient_accumulation_steps",
                       self.gradient_accumulation_steps, int)
            check_min("DeepSpeed", "gradient_accumulation_steps",
                      self.gradient_accumulation_steps, 1)
        if self.gradient_clipping is not None:
            check_type("DeepSpeed", "gradient_clipping", self.gradient_clipping, (int, float))
            check_min("DeepSpeed", "gradient_clipping", self.gradient_clipping, 0)
        for key in ("optimizer", "param"):
            path = getattr(self, f"offload_{key}_nvme_path")
            if path is None:
                continue
            check_type("DeepSpeed", f"offload_{key}_nvme_path", path, str)
            if getattr(self, f"offload_{key}") != "nvme":
                msg = (f"DeepSpeed: offload_{key}_nvme_path must come with offload_{key}='nvme',"
                       f" but got offload_{key}={getattr(self, f'offload_{key}')!r}. Set both, "
                       "or drop the path.")
                raise ValueError(msg)
        if self.gather_16bit_weights_on_save is not None:
            check_type("DeepSpeed", "gather_16bit_weights_on_save",
                       self.gather_16bit_weights_on_save, bool)


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


def plan_config(strategy: DeepSpeed, env: Any, *, has_optimizer: bool) -> dict[str, Any]:
    """The DeepSpeed config for this strategy and Env, "auto" and absent fields filled in.

    Accumulation steps, clipping, ZeRO stage, offload and precision come from the strategy and
    the Env, so they never disagree with the config; the micro-batch size, which DeepSpeed
    only logs here, defaults to 1.

    Raises:
        ConfigError: the config contradicts the strategy or the Env.

    Examples:
        >>> from distlib.env import Env
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


def apply(model: Any, strategy: DeepSpeed, env: Any, *, optimizer: Any = None,
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
    import os

    from distlib.precision import AutocastForward, check_supported, compute_dtype
    from distlib.runtime import initialize, is_initialized
    from distlib.strategies._handle import ATTRIBUTE, EngineOptimizer, Handle

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
    wrapped_optimizer = EngineOptimizer(engine) if ds_optimizer is not None else None
    handle = Handle(strategy=strategy, env=env, precision=env.precision, module=engine.module,
                    engine=engine, optimizer=wrapped_optimizer)
    object.__setattr__(engine, ATTRIBUTE, handle)
    return engine, wrapped_optimizer, scheduler
