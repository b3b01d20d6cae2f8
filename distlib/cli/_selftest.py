"""What ``distlib test`` checks of a strategy's options, and what it cannot (pure, torch-free).

The self-test trains tiny models of its own, so options written for a user's model are
fitted to them: FSDP ``wrap_classes`` become the class names of the toy models' layers
(classes of those names are built at run time; ``"auto"`` gives them a
``_no_split_modules``), DeepSpeed's accumulation steps and clipping become the checks' own.
What cannot be fitted (a DeepSpeed config's optimizer and scheduler blocks: the self-test
trains with its own SGD) is left out of the strategy the checks wrap with and reported as
"not checked: needs your model", never a failure.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from distlib.errors import ConfigError
from distlib.strategies.deepspeed import DeepSpeed
from distlib.strategies.fsdp import AUTO, FSDP

__all__ = ["AUTO_CLASS", "DEFAULT_ACCUMULATION", "DEFAULT_MAX_NORM", "SelfTestPlan",
           "plan_self_test"]

AUTO_CLASS = "Block"  # the class the toy models list in _no_split_modules for wrap_classes="auto"
DEFAULT_ACCUMULATION = 2  # micro-steps per optimizer step when the strategy names none
DEFAULT_MAX_NORM = 1.0  # the norm the checks clip to when the strategy names none
_NOT_FITTED = ("optimizer", "scheduler")  # DeepSpeed config blocks the toy training cannot use


@dataclass(frozen=True, slots=True, kw_only=True)
class SelfTestPlan:
    """How the self-test's checks apply the configured strategy to their toy models.

    Attributes:
        strategy: the strategy the checks wrap with: the configured one, less what the toy
            models cannot use (see ``not_checked``).
        unit_classes: class names the toy models' layers take (FSDP ``wrap_classes``).
        no_split_modules: the toy models list ``unit_classes`` in ``_no_split_modules``
            (``wrap_classes="auto"``; a model with its own list keeps it).
        accumulation_steps: micro-steps per optimizer step in the training check.
        max_norm: the norm the checks clip gradients to.
        not_checked: one line per option the self-test leaves to the user's model.
    """

    strategy: Any
    unit_classes: tuple[str, ...] = ()
    no_split_modules: bool = False
    accumulation_steps: int = DEFAULT_ACCUMULATION
    max_norm: float = DEFAULT_MAX_NORM
    not_checked: tuple[str, ...] = field(default=(), hash=False)


def plan_self_test(strategy: Any) -> SelfTestPlan:
    """The self-test's plan for ``strategy`` (a strategy value, e.g. ``Env.strategy``).

    Raises:
        ConfigError: a DeepSpeed ``config`` file that is not a readable JSON object.

    Examples:
        >>> plan_self_test(FSDP(wrap_classes="Block,Layer")).unit_classes
        ('Block', 'Layer')
        >>> plan = plan_self_test(DeepSpeed(config={"optimizer": {"type": "AdamW"},
        ...                                         "gradient_accumulation_steps": 4}))
        >>> plan.accumulation_steps, plan.strategy.config
        (4, {'gradient_accumulation_steps': 4})
        >>> print(*plan.not_checked)
        deepspeed_config_file: its `optimizer` block (AdamW): needs your model (the self-test trains with its own SGD)

    Effects: reads a DeepSpeed config file named by the strategy.
    """
    if isinstance(strategy, FSDP):
        return _plan_fsdp(strategy)
    if isinstance(strategy, DeepSpeed):
        return _plan_deepspeed(strategy)
    return SelfTestPlan(strategy=strategy)


def _plan_fsdp(strategy: FSDP) -> SelfTestPlan:
    auto = strategy.wrap_classes == (AUTO,)
    classes = (AUTO_CLASS,) if auto else strategy.wrap_classes
    notes = []
    if not classes and strategy.min_num_params <= 0:
        unit_only = [f"fsdp_{name}" for name in ("activation_checkpointing", "forward_prefetch")
                     if getattr(strategy, name)]
        if unit_only:
            notes.append(f"{', '.join(unit_only)}: wrap applies it to FSDP units, "
                         "and with no fsdp_wrap_classes and no fsdp_min_num_params no model "
                         "has any (wrap refuses it on yours unless it has units)")
            strategy = dataclasses.replace(strategy, activation_checkpointing=False,
                                           forward_prefetch=False)
    return SelfTestPlan(strategy=strategy, unit_classes=classes, no_split_modules=auto,
                        not_checked=tuple(notes))


def _plan_deepspeed(strategy: DeepSpeed) -> SelfTestPlan:
    config = _deepspeed_config(strategy.config)
    notes = []
    for key in _NOT_FITTED:
        if key in config:
            block = config.pop(key)
            kind = block.get("type", "?") if isinstance(block, Mapping) else block
            notes.append(f"deepspeed_config_file: its `{key}` block ({kind}): "
                         "needs your model (the self-test trains with its own SGD)")
    steps = strategy.gradient_accumulation_steps or _number(
        config.get("gradient_accumulation_steps")) or DEFAULT_ACCUMULATION
    norm = strategy.gradient_clipping or _number(config.get("gradient_clipping"))
    fitted = strategy if strategy.config is None else dataclasses.replace(strategy, config=config)
    return SelfTestPlan(strategy=fitted, accumulation_steps=int(steps),
                        max_norm=float(norm or DEFAULT_MAX_NORM), not_checked=tuple(notes))


def _number(value: Any) -> float | None:
    """A config value that is a positive number (not "auto", not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return value


def _deepspeed_config(config: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        copied: dict[str, Any] = json.loads(json.dumps(dict(config)))  # plain JSON values
        return copied
    try:
        with open(config, encoding="utf-8") as handle:
            loaded = json.load(handle)
    except (OSError, ValueError) as error:
        why = getattr(error, "strerror", None) or str(error)
        msg = (f"self-test: `deepspeed_config_file` must name a readable JSON file, but got "
               f"{config!r} ({why}). Fix the file, or its path (the config key "
               "`deepspeed_config_file`, --deepspeed-config-file).")
        raise ConfigError(msg) from None
    if not isinstance(loaded, dict):
        msg = (f"self-test: `deepspeed_config_file` must hold a JSON object, but got a "
               f"{type(loaded).__name__} in {config!r}. Write the DeepSpeed config as {{...}}.")
        raise ConfigError(msg)
    return loaded
