"""The `Wrapped` protocol: everything a wrapped model needs after `wrap`, on one object.

Each applier (``single.py``, ``ddp.py``, ...) implements it for its strategy; the model that
`wrap` returns carries its Wrapped as an attribute (nothing is kept in a registry), so two
models wrapped independently (a GAN, a teacher and a student) never share a scaler or an
engine. `backward`, `clip_grad_norm`, `save_state`, `export_weights` and `free_memory` call
the protocol instead of asking which strategy is in use.
"""

from __future__ import annotations

import pathlib
from typing import Any, Protocol, runtime_checkable

import torch

from distlib.env import Env
from distlib.strategies.base import Strategy
from distlib.training.accumulation import MicroStep

__all__ = ["ATTRIBUTE", "Wrapped", "attach", "detach", "owner_of", "wrapped_of"]

# The attribute of a wrapped model that holds its Wrapped.
ATTRIBUTE = "_distlib_handle"
# The attribute of an optimizer view (fp16-scaled, DeepSpeed, XLA) that holds its Wrapped.
OWNER_ATTRIBUTE = "_distlib_owner"


@runtime_checkable
class Wrapped(Protocol):
    """What one wrapped model does at step time, at save time and when it is released.

    Attributes:
        strategy: the strategy value applied.
        env: the Env it was applied under.
        module: the user's module (what `unwrap` returns).
        optimizer: the optimizer view `wrap` returned, or None.
        scaler: the ``GradScaler`` (fp16 outside DeepSpeed) or None; `save_state` saves it.
        saves_itself: True when the model saves and loads its own state (DeepSpeed
            engines): checkpoints call `save_checkpoint` / `load_checkpoint`.
    """

    strategy: Strategy
    env: Env
    module: torch.nn.Module
    optimizer: Any
    scaler: Any
    saves_itself: bool

    def backward(self, loss: torch.Tensor, micro: MicroStep | None) -> None:
        """Back-propagate ``loss`` (already divided by the window), syncing on ``micro.sync``."""
        ...

    def clip_grad_norm(self, max_norm: float, norm_type: float) -> torch.Tensor | None:
        """Clip the gradients to ``max_norm``; the total norm before, or None if clipped later."""
        ...

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole model's tensors on the main rank's CPU, ``{}`` elsewhere (collective)."""
        ...

    def save_checkpoint(self, folder: pathlib.Path) -> None:
        """Write the model's own checkpoint into ``folder`` (only when ``saves_itself``)."""
        ...

    def load_checkpoint(self, folder: pathlib.Path) -> bool:
        """Read the model's own checkpoint from ``folder``; True if one was loaded."""
        ...

    def release(self) -> None:
        """Undo what `wrap` hung on the model and free what the strategy holds (idempotent)."""
        ...


def attach(model: Any, wrapped: Wrapped) -> Any:
    """Hang ``wrapped`` on the model `wrap` returns (and on its optimizer view); return the model.

    A user's own strategy calls this at the end of its ``apply``.

    Effects: sets an attribute on ``model`` and, when it is a view, on ``wrapped.optimizer``.
    """
    object.__setattr__(model, ATTRIBUTE, wrapped)
    optimizer = wrapped.optimizer
    if optimizer is not None and hasattr(type(optimizer), OWNER_ATTRIBUTE):
        object.__setattr__(optimizer, OWNER_ATTRIBUTE, wrapped)
    return model


def detach(model: Any) -> None:
    """Take the Wrapped off a model it was attached to (nothing if there is none).

    Effects: deletes the attribute `attach` set.
    """
    if ATTRIBUTE in getattr(model, "__dict__", {}):
        object.__delattr__(model, ATTRIBUTE)


def wrapped_of(obj: Any) -> Wrapped | None:
    """The Wrapped of a model returned by ``wrap`` (also compiled), or None for a plain one.

    Examples:
        >>> import torch
        >>> wrapped_of(torch.nn.Linear(1, 1)) is None
        True
    """
    wrapped = getattr(obj, ATTRIBUTE, None)
    return wrapped if isinstance(wrapped, Wrapped) else None


def owner_of(optimizer: Any) -> Wrapped | None:
    """The Wrapped whose optimizer view ``optimizer`` is, or None (a plain optimizer).

    Examples:
        >>> import torch
        >>> owner_of(torch.optim.SGD([torch.zeros(1)], lr=0.1)) is None
        True
    """
    if not hasattr(type(optimizer), OWNER_ATTRIBUTE):
        return None
    owner = getattr(optimizer, OWNER_ATTRIBUTE, None)
    return owner if isinstance(owner, Wrapped) else None
