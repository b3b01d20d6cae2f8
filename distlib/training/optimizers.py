"""The optimizer views `wrap` returns: one object whose groups and state are the user's.

`DelegatingOptimizer` reads and writes the inner optimizer; `ScaledOptimizer` steps it through
fp16's ``GradScaler``. The DeepSpeed and XLA views live beside their appliers.
"""

from __future__ import annotations

from typing import Any

import torch

from distlib.errors import StrategyError

__all__ = ["DelegatingOptimizer", "ScaledOptimizer"]


class DelegatingOptimizer(torch.optim.Optimizer):
    """An optimizer that is a view of ``self.optimizer``: groups, state and state dicts are its.

    Subclasses change how ``step`` (and perhaps ``zero_grad``) runs; everything else reads
    and writes the inner optimizer, so schedulers, checkpoints and the user see one object.
    """

    optimizer: Any
    _OWN: tuple[str, ...] = ("optimizer", "__setstate__")
    _distlib_owner: Any = None  # the Wrapped this is the view of (see distlib.training.attach)

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

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        super().__init__(optimizer)
        self.scaler = scaler
        self.skipped_steps = 0
        self.step_was_skipped = False

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Unscale, step unless a gradient overflowed, update the scale; count skips."""
        if closure is not None:
            msg = ("optimizer.step(): closure must be None under fp16 grad scaling, but got a "
                   "callable. Compute the loss outside step() and call distlib.backward.")
            raise _ClosureError(msg)
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self._distlib_owner is not None:  # the next window unscales again
            self._distlib_owner.unscaled = False
        self.step_was_skipped = self.scaler.get_scale() < before
        self.skipped_steps += int(self.step_was_skipped)
        return None


class _ClosureError(StrategyError, TypeError):
    """A closure passed to a scaled optimizer's step (a ``TypeError`` as before)."""
