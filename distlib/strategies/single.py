"""The `Single` strategy: one process, the model placed on the Env's device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["Single", "apply"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Single:
    """One process; ``wrap`` only moves the model to the device.

    Examples:
        >>> Single()
        Single()
    """

    name: ClassVar[str] = "single"


def apply(model: Any, strategy: Single, env: Any, *, optimizer: Any = None,
          scheduler: Any = None) -> tuple[Any, Any, Any]:
    """Place the model on the Env's device, in the Env's precision.

    Returns:
        ``(model, optimizer, scheduler)``; the model is the user's own module, moved; the
        optimizer steps through a ``GradScaler`` under fp16.

    Effects: moves ``model`` in place and, for bf16/fp16, sets its ``forward`` attribute to
    an autocast wrapper.
    """
    from distlib.runtime import initialize
    from distlib.strategies._handle import Handle, attach, place_with_precision

    initialize(env)
    scaler = place_with_precision(model, env)
    handle = Handle(strategy=strategy, env=env, precision=env.precision, module=model,
                    scaler=scaler)
    return attach(model, handle, optimizer, scheduler)
