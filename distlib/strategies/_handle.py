"""What a wrapped model carries for later calls: its handle, and the optimizer wrappers.

Imported only by the apply functions and the training step (it imports torch). Nothing here is
global: each wrapped model holds its own `Handle` as an attribute, so two models wrapped
independently (a GAN, a teacher and a student) never share a scaler or an engine.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ATTRIBUTE", "SCHEDULER_STEPS", "AccelerateScheduler", "DelegatingOptimizer",
           "EngineOptimizer", "Handle", "ScaledOptimizer", "handle_of"]

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

    @property
    def step_was_skipped(self) -> bool:
        """True when the engine's last step found an fp16 overflow and left the weights."""
        return bool(getattr(self.engine.optimizer, "overflow", False))

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.engine.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()


# The values of wrap(scheduler_steps=...): one inner step per call, or Accelerate's stepping.
SCHEDULER_STEPS = ("once", "accelerate")


class _Updates:
    """Counts the updates an optimizer applied to the weights (not the skipped steps).

    A DeepSpeed engine counts them itself (boundary steps minus overflow skips); any other
    optimizer gets a step post-hook on the torch optimizer that really updates the weights
    (inside fp16's ``GradScaler``, which does not call it when a gradient overflowed).
    """

    __slots__ = ("count", "engine")

    def __init__(self, optimizer: Any) -> None:
        self.count = 0
        self.engine = optimizer.engine if isinstance(optimizer, EngineOptimizer) else None
        if self.engine is None:
            inner = optimizer
            while isinstance(inner, DelegatingOptimizer):
                inner = inner.optimizer
            inner.register_step_post_hook(self._bump)

    def _bump(self, *_: Any) -> None:
        self.count += 1

    def __call__(self) -> int:
        if self.engine is not None:
            return int(self.engine.global_steps) - int(self.engine.skipped_steps)
        return self.count


class AccelerateScheduler:
    """A learning-rate scheduler stepped the way Accelerate's ``AcceleratedScheduler`` is.

    What ``wrap(..., scheduler_steps="accelerate")`` returns. Each ``step()`` advances the
    inner scheduler ``steps_per_call`` times — the world size, because Accelerate's schedule
    counts batches of the unsharded loader while each rank steps once per global batch; 1
    when the loaders split batches — but only if the optimizer updated the weights since the
    previous call. So it does not move after an fp16 step skipped for overflow (grad scaler or
    DeepSpeed), nor on a micro-step that did not call ``optimizer.step()``. A OneCycle-style
    scheduler (``total_steps``) is never stepped past its end. ``state_dict`` is the inner
    scheduler's, so checkpoints move between the two stepping modes.

    Args:
        scheduler: the user's ``torch.optim.lr_scheduler`` scheduler.
        optimizer: the optimizer ``wrap`` returned (plain, fp16-scaled, XLA or DeepSpeed).
        steps_per_call: inner steps per ``step()`` (an int >= 1).

    Examples:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
        >>> sched = AccelerateScheduler(
        ...     torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step)), opt,
        ...     steps_per_call=2)
        >>> sched.step()                     # no optimizer step since: nothing moves
        >>> opt.step(); sched.step()         # one update: two inner steps
        >>> sched.get_last_lr(), sched.last_epoch
        ([0.3333333333333333], 2)
    """

    def __init__(self, scheduler: Any, optimizer: Any, *, steps_per_call: int) -> None:
        if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) or \
                steps_per_call < 1:
            msg = (f"AccelerateScheduler(): steps_per_call must be an int >= 1, but got "
                   f"{steps_per_call!r}. Pass the world size, or 1 for split batches.")
            raise ValueError(msg)
        self.scheduler = scheduler
        self.optimizer = optimizer
        self.steps_per_call = steps_per_call
        self.skipped_calls = 0
        self._updates = _Updates(optimizer)
        self._seen = self._updates()

    @classmethod
    def for_env(cls, scheduler: Any, optimizer: Any, env: Any, *,
                split_batches: bool = False) -> AccelerateScheduler:
        """Step ``env.world_size`` times per call (once with ``split_batches``), as Accelerate.

        Examples:
            >>> import torch
            >>> from distlib.testing import fake_env
            >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
            >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
            >>> AccelerateScheduler.for_env(sched, opt, fake_env(rank=0, world_size=4))
            AccelerateScheduler(StepLR, steps_per_call=4)
        """
        return cls(scheduler, optimizer, steps_per_call=1 if split_batches else env.world_size)

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Advance ``steps_per_call`` times if the optimizer updated the weights since the last call.

        Effects: steps the inner scheduler, which sets the optimizer's learning rates.
        """
        updates = self._updates()
        if updates == self._seen:
            self.skipped_calls += 1
            return
        self._seen = updates
        total = getattr(self.scheduler, "total_steps", None)
        for _ in range(self.steps_per_call):
            if total is not None and self.scheduler._step_count > total:
                return
            self.scheduler.step(*args, **kwargs)

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()  # type: ignore[no-any-return]

    def get_lr(self) -> Any:
        return self.scheduler.get_lr()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()  # type: ignore[no-any-return]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("scheduler", "optimizer", "_updates", "_seen"):
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __repr__(self) -> str:
        return (f"AccelerateScheduler({type(self.scheduler).__name__}, "
                f"steps_per_call={self.steps_per_call})")


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
