"""What a wrapped model carries for later calls: its handle, and the optimizer wrappers.

Imported only by the apply functions and the training step (it imports torch). Nothing here is
global: each wrapped model holds its own `Handle` as an attribute, so two models wrapped
independently (a GAN, a teacher and a student) never share a scaler or an engine.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ATTRIBUTE", "DelegatingOptimizer", "EngineOptimizer", "Handle", "ScaledOptimizer",
           "handle_of"]

# The attribute of a wrapped model that holds its Handle.
ATTRIBUTE = "_distlib_handle"


class Handle:
    """The pieces of one wrapped model that `backward` and `clip_grad_norm` need.

    Attributes:
        strategy: the strategy value applied.
        env: the Env it was applied under.
        precision: the `Precision` in use.
        module: the user's module (what `unwrap` returns).
        ddp: the ``DistributedDataParallel`` wrapper, if any.
        fsdp: the FSDP2 root module, if any.
        engine: the DeepSpeed engine, if any.
        scaler: the ``GradScaler`` (fp16 outside DeepSpeed), if any.
        optimizer: the optimizer returned by ``wrap`` (scaled or engine-driven), if any.
    """

    __slots__ = ("ddp", "engine", "env", "fsdp", "module", "optimizer", "precision", "scaler",
                 "strategy", "unscaled")

    def __init__(self, *, strategy: Any, env: Any, precision: Any, module: Any,
                 ddp: Any = None, fsdp: Any = None, engine: Any = None, scaler: Any = None,
                 optimizer: Any = None) -> None:
        self.strategy = strategy
        self.env = env
        self.precision = precision
        self.module = module
        self.ddp = ddp
        self.fsdp = fsdp
        self.engine = engine
        self.scaler = scaler
        self.optimizer = optimizer
        self.unscaled = False  # gradients of this window already unscaled by clip_grad_norm

    def __repr__(self) -> str:
        return (f"Handle(strategy={self.strategy!r}, precision={self.precision!r}, "
                f"scaler={self.scaler is not None}, engine={self.engine is not None})")


def handle_of(model: Any) -> Handle | None:
    """The Handle of a model returned by ``wrap``, or None for a plain module."""
    handle = getattr(model, ATTRIBUTE, None)
    return handle if isinstance(handle, Handle) else None


class DelegatingOptimizer(torch.optim.Optimizer):
    """An optimizer that is a view of ``self.optimizer``: groups, state and state dicts are its.

    Subclasses change how ``step`` (and perhaps ``zero_grad``) runs; everything else reads
    and writes the inner optimizer, so schedulers, checkpoints and the user see one object.
    """

    optimizer: Any
    _OWN: tuple[str, ...] = ("optimizer", "__setstate__")

    def __init__(self, optimizer: Any) -> None:
        # No super().__init__: the param groups and state stay the inner optimizer's.
        self.optimizer = optimizer

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups  # type: ignore[no-any-return]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return getattr(self.optimizer, "defaults", {})

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()  # type: ignore[no-any-return]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __getattr__(self, name: str) -> Any:
        if name in type(self)._OWN:
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.optimizer).__name__})"


class ScaledOptimizer(DelegatingOptimizer):
    """The user's optimizer stepped through a ``GradScaler`` (fp16).

    ``step()`` unscales (unless `clip_grad_norm` already did), skips the update when a
    gradient overflowed, and adjusts the scale. Skipped steps are counted, not hidden:
    ``step_was_skipped`` tells about the last step and ``skipped_steps`` counts all of them.
    Everything else (``param_groups``, ``state``, ``state_dict``) is the user's optimizer's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: Any, handle: Handle) -> None:
        super().__init__(optimizer)
        self.scaler = scaler
        self._handle = handle
        self.skipped_steps = 0
        self.step_was_skipped = False

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Unscale, step unless a gradient overflowed, update the scale; count skips."""
        if closure is not None:
            msg = ("optimizer.step(): closure must be None under fp16 grad scaling, but got a "
                   "callable. Compute the loss outside step() and call distlib.backward.")
            raise TypeError(msg)
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._handle.unscaled = False
        self.step_was_skipped = self.scaler.get_scale() < before
        self.skipped_steps += int(self.step_was_skipped)
        return None


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

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.engine.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()


def attach(wrapped: Any, handle: Handle, optimizer: Any, scheduler: Any) -> tuple[Any, Any, Any]:
    """Hang the handle on the wrapped model; wrap the optimizer when fp16 scales gradients.

    Returns:
        ``(wrapped, optimizer, scheduler)`` as ``wrap`` hands them back.
    """
    if optimizer is not None and handle.scaler is not None:
        optimizer = ScaledOptimizer(optimizer, handle.scaler, handle)
    handle.optimizer = optimizer
    object.__setattr__(wrapped, ATTRIBUTE, handle)
    return wrapped, optimizer, scheduler


def place_with_precision(model: Any, env: Any, *, autocast: bool = True) -> Any:
    """Move ``model`` to the Env's device and run its forward in the Env's precision.

    Returns the GradScaler for fp16, else None. With ``autocast=False`` only the scaler is
    made (FSDP2 casts through its own policy).

    Effects: moves ``model`` in place; for bf16/fp16 replaces its ``forward`` attribute with
    an `AutocastForward` (outputs come back in fp32).
    """
    from distlib.precision import (
        AutocastForward,
        Precision,
        check_supported,
        compute_dtype,
        convert_fp8,
        make_scaler,
    )

    precision = check_supported(env.precision, env.device)
    model.to(env.torch_device)
    if precision is Precision.FP8:
        convert_fp8(model)
    dtype = compute_dtype(precision)
    if autocast and dtype is not None:
        model.forward = AutocastForward(model.forward, env.torch_device.type, dtype)
    return make_scaler(precision, env.device)
