"""`AccelerateScheduler`: a learning-rate scheduler stepped the way Accelerate's is."""

from __future__ import annotations

from typing import Any

from distlib.env import Env
from distlib.errors import ConfigError
from distlib.training.optimizers import DelegatingOptimizer

__all__ = ["SCHEDULER_STEPS", "AccelerateScheduler"]


# The values of wrap(scheduler_steps=...): one inner step per call, or Accelerate's stepping.
SCHEDULER_STEPS = ("once", "accelerate")


class _Updates:
    """Counts the updates an optimizer applied to the weights (not the skipped steps).

    A view that counts them itself (a DeepSpeed engine's: boundary steps minus overflow skips)
    has a ``num_updates`` property; any other optimizer gets a step post-hook on the torch
    optimizer that really updates the weights (inside fp16's ``GradScaler``, which does not
    call it when a gradient overflowed).
    """

    __slots__ = ("count", "counted")

    def __init__(self, optimizer: Any) -> None:
        self.count = 0
        self.counted = optimizer if hasattr(type(optimizer), "num_updates") else None
        if self.counted is None:
            inner = optimizer
            while isinstance(inner, DelegatingOptimizer):
                inner = inner.optimizer
            inner.register_step_post_hook(self._bump)

    def _bump(self, *_: Any) -> None:
        self.count += 1

    def __call__(self) -> int:
        if self.counted is not None:
            return int(self.counted.num_updates)
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
            raise ConfigError(msg)
        self.scheduler = scheduler
        self.optimizer = optimizer
        self.steps_per_call = steps_per_call
        self.skipped_calls = 0
        self._updates = _Updates(optimizer)
        self._seen = self._updates()

    @classmethod
    def for_env(cls, scheduler: Any, optimizer: Any, env: Env, *,
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
