"""The `Strategy` protocol and the name <-> value mapping of the built-in strategy values.

Strategy values are frozen, hashable and torch-free; the code that applies them lives in
``distlib.training`` (one applier per strategy), above `env` and `runtime`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, runtime_checkable

from distlib.errors import ConfigError
from distlib.strategies.ddp import DDP
from distlib.strategies.deepspeed import DeepSpeed
from distlib.strategies.fsdp import FSDP
from distlib.strategies.single import Single
from distlib.strategies.xla import XLA

__all__ = ["STRATEGY_NAMES", "Strategy", "parse_strategy", "strategy_options"]


@runtime_checkable
class Strategy(Protocol):
    """What every strategy value has: a stable lowercase ``name``.

    A user's own strategy is a frozen value with a ``name`` and an ``apply(model, env, *,
    optimizer, scheduler)`` method (see `distlib.training.wrap`).
    """

    name: ClassVar[str]


# name -> the built-in strategy value class (read-only).
_CLASSES: Mapping[str, type] = MappingProxyType(
    {cls.name: cls for cls in (Single, DDP, FSDP, DeepSpeed, XLA)})

STRATEGY_NAMES = tuple(_CLASSES)


def parse_strategy(
    value: object, options: Mapping[str, Any] | None = None, *, source: str = "strategy"
) -> Strategy:
    """Build a strategy value from a name (or pass a value through).

    Args:
        value: a built-in strategy value, or one of ``"single"``, ``"ddp"``, ``"fsdp"``,
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
    if isinstance(value, tuple(_CLASSES.values())):
        if options:
            return dataclasses.replace(value, **dict(options))  # type: ignore[type-var,return-value]
        return value  # type: ignore[return-value]
    name = value.strip().lower() if isinstance(value, str) else None
    if name is None or name not in _CLASSES:
        msg = (
            f"{source} must be one of {', '.join(map(repr, STRATEGY_NAMES))}, but got "
            f"{value!r}. Pick the strategy by name, e.g. --strategy ddp."
        )
        raise ConfigError(msg)
    cls = _CLASSES[name]
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
