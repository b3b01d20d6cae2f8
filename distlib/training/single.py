"""The `Single` applier: the model placed on the Env's device, in the Env's precision.

`SingleWrapped` is also the shared base of the strategies whose step runs in this process's
autograd (DDP, FSDP2, XLA): fp16 grad scaling, clipping, full weights, releasing.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from distlib.env import Env
from distlib.errors import StrategyError
from distlib.precision import (
    AutocastForward,
    Precision,
    check_supported,
    compute_dtype,
    convert_fp8,
    make_scaler,
)
from distlib.runtime import initialize
from distlib.strategies.base import Strategy
from distlib.strategies.single import Single
from distlib.training.accumulation import MicroStep
from distlib.training.optimizers import ScaledOptimizer
from distlib.training.step import clip_module
from distlib.training.wrapped import attach, detach

__all__ = ["SingleWrapped", "apply", "full_state_of", "place_with_precision"]


class SingleWrapped:
    """A model trained by this process's own autograd (`Single`; the base of DDP, FSDP, XLA).

    Attributes:
        strategy: the strategy value applied.
        env: the Env it was applied under.
        module: the user's module (what `unwrap` returns).
        wrapper: the model `wrap` returned (the module itself, or its DDP wrapper); it
            carries this object.
        optimizer: the optimizer view `wrap` returned (fp16: a `ScaledOptimizer`), or None.
        scaler: the ``GradScaler`` under fp16, else None.
        unscaled: the gradients of this window are already unscaled (by `clip_grad_norm`).
    """

    saves_itself: bool = False

    def __init__(self, *, strategy: Strategy, env: Env, module: torch.nn.Module,
                 scaler: Any = None, wrapper: Any = None) -> None:
        self.strategy = strategy
        self.env = env
        self.module = module
        self.wrapper = module if wrapper is None else wrapper
        self.scaler = scaler
        self.optimizer: Any = None
        self.unscaled = False

    def attach(self, optimizer: Any, scheduler: Any) -> tuple[Any, Any, Any]:
        """Hang this on the wrapper; step the optimizer through the scaler under fp16.

        Returns:
            ``(wrapper, optimizer, scheduler)`` as ``wrap`` hands them back.

        Effects: sets an attribute on the wrapper (and on the optimizer view).
        """
        if optimizer is not None and self.scaler is not None:
            optimizer = ScaledOptimizer(optimizer, self.scaler)
        self.optimizer = optimizer
        return attach(self.wrapper, self), optimizer, scheduler

    def scale(self, loss: torch.Tensor, call: str = "backward()") -> torch.Tensor:
        """The loss scaled for fp16 (unchanged without a scaler)."""
        if self.scaler is None:
            return loss
        if self.optimizer is None:
            msg = (f"{call}: under fp16 the optimizer must be passed to wrap() (its step "
                   "has to go through the grad scaler), but got a model wrapped without one. "
                   "Use wrap(model, env, optimizer=opt).")
            raise StrategyError(msg)
        return self.scaler.scale(loss)  # type: ignore[no-any-return]

    def backward(self, loss: torch.Tensor, micro: MicroStep | None) -> None:
        """Plain backward of the (fp16-scaled) loss."""
        self.scale(loss).backward()  # type: ignore[no-untyped-call]

    def unscale(self) -> None:
        """Unscale this window's fp16 gradients once (before clipping)."""
        if self.scaler is None or self.unscaled:
            return
        if self.optimizer is None:
            msg = ("clip_grad_norm(): under fp16 the optimizer must be passed to wrap(), but "
                   "got a model wrapped without one. Use wrap(model, env, optimizer=opt).")
            raise StrategyError(msg)
        self.scaler.unscale_(self.optimizer.optimizer)
        self.unscaled = True

    def clip_grad_norm(self, max_norm: float, norm_type: float) -> torch.Tensor | None:
        """Unscale (fp16) and clip the module's gradients; the total norm before clipping."""
        self.unscale()
        return clip_module(self.module, max_norm, norm_type)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole module's tensors on the main rank's CPU (``{}`` elsewhere; collective)."""
        return full_state_of(self.module, self.env)

    def save_checkpoint(self, folder: pathlib.Path) -> None:
        """Refused: this model's state is saved by `save_state`'s own format."""
        msg = (f"save_checkpoint(): the model must save itself (saves_itself=True), but got a "
               f"{self.strategy.name!r} model. Save it with dl.save_state(path, env, model=...).")
        raise StrategyError(msg)

    def load_checkpoint(self, folder: pathlib.Path) -> bool:
        """Refused: this model's state is loaded by `load_state`'s own format."""
        msg = (f"load_checkpoint(): the model must save itself (saves_itself=True), but got a "
               f"{self.strategy.name!r} model. Load it with dl.load_state(path, env, model=...).")
        raise StrategyError(msg)

    def release(self) -> None:
        """Take the autocast forward and this object off the model; drop the scaler and view.

        Effects: deletes the ``forward`` attribute distlib set and the attribute that holds
        this object, which breaks the reference cycles they made.
        """
        for target in (self.wrapper, self.module):
            if isinstance(getattr(target, "__dict__", {}).get("forward"), AutocastForward):
                del target.forward
        detach(self.wrapper)
        self.optimizer = None
        self.scaler = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(strategy={self.strategy!r}, "
                f"precision={self.env.precision!r}, scaler={self.scaler is not None})")


def full_state_of(module: torch.nn.Module, env: Env) -> dict[str, torch.Tensor]:
    """A module's whole state dict on the main rank's CPU, ``{}`` on the other ranks.

    FSDP2's shards are gathered (``get_model_state_dict`` with ``full_state_dict`` and
    ``cpu_offload``); a plain module's tensors are copied to the CPU.

    Effects: all-gathers across the ranks for a sharded module (call it on every rank).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: dict[str, Any] = get_model_state_dict(module, options=options)
    return state if env.is_main else {}


def _move_unless_meta(model: torch.nn.Module, device: torch.device) -> None:
    """``model.to(device)``, leaving meta tensors where they are (`load_checkpoint` fills them).

    A model built under `init_empty_weights` keeps its real buffers (rotary ``inv_freq``);
    they move, its meta parameters stay meta until a (sharded) load gives them storage.
    """
    tensors = [*model.parameters(), *model.buffers()]
    if not any(t.is_meta for t in tensors):
        model.to(device)
        return
    with torch.no_grad():
        for param in model.parameters():
            if not param.is_meta and param.device != device:
                param.data = param.data.to(device)
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if not buffer.is_meta and buffer.device != device:
                    setattr(module, name, buffer.to(device))


def place_with_precision(model: torch.nn.Module, env: Env, *, autocast: bool = True) -> Any:
    """Move ``model`` to the Env's device and run its forward in the Env's precision.

    Returns the GradScaler for fp16, else None. With ``autocast=False`` only the scaler is
    made (FSDP2 casts through its own policy).

    Effects: moves ``model`` in place (meta tensors stay meta); for bf16/fp16 replaces its
    ``forward`` attribute with an `AutocastForward` (outputs come back in fp32).
    """
    precision = check_supported(env.precision, env.device)
    _move_unless_meta(model, env.torch_device)
    if precision is Precision.FP8:
        convert_fp8(model)
    dtype = compute_dtype(precision)
    if autocast and dtype is not None:
        model.forward = AutocastForward(model.forward, env.torch_device.type, dtype)  # type: ignore[method-assign]
    return make_scaler(precision, env.device)


def apply(model: torch.nn.Module, strategy: Single, env: Env, *, optimizer: Any = None,
          scheduler: Any = None) -> tuple[Any, Any, Any]:
    """Place the model on the Env's device, in the Env's precision.

    Returns:
        ``(model, optimizer, scheduler)``; the model is the user's own module, moved; the
        optimizer steps through a ``GradScaler`` under fp16.

    Effects: moves ``model`` in place and, for bf16/fp16, sets its ``forward`` attribute to
    an autocast wrapper.
    """
    initialize(env)
    scaler = place_with_precision(model, env)
    wrapped = SingleWrapped(strategy=strategy, env=env, module=model, scaler=scaler)
    return wrapped.attach(optimizer, scheduler)
