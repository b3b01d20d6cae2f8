"""Accumulation windows: `MicroStep` and `accumulate` (pure; no torch).

`accumulate` tells each batch where it sits in its window; `backward` divides by the window's
size and lets the strategy skip the gradient sync except on a window's last batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from distlib.errors import ConfigError

__all__ = ["MicroStep", "accumulate", "plan_window"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MicroStep:
    """Where one batch sits in its accumulation window.

    Attributes:
        step: the index of the optimizer step this batch contributes to (0, 1, ...).
        index: the batch's position in its window (0 .. ``size - 1``).
        size: how many batches the window holds (``steps``, or fewer for the last window of
            a loader whose length is known).
        sync: True on the window's last batch: gradients are synchronised there and the
            optimizer should step.
        next_sync: True when the next batch will be a window's last batch (or is unknown);
            DDP uses it to prepare the next forward.

    Examples:
        >>> MicroStep(step=0, index=1, size=2, sync=True, next_sync=False).sync
        True
    """

    step: int
    index: int
    size: int
    sync: bool
    next_sync: bool = True

    def __post_init__(self) -> None:
        for name in ("step", "index", "size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                msg = (f"MicroStep(): {name} must be an int >= 0, but got {value!r}. Take the "
                       "MicroStep that accumulate() yields rather than building one.")
                raise ConfigError(msg)
        if not 0 <= self.index < max(self.size, 1):
            msg = (f"MicroStep(): index must be in [0, size), but got index={self.index}, "
                   f"size={self.size}. Take the MicroStep that accumulate() yields.")
            raise ConfigError(msg)


def plan_window(position: int, steps: int, total: int | None) -> tuple[int, int, int]:
    """``(step, index, size)`` of batch number ``position`` (0-based).

    Windows hold ``steps`` batches; with a known ``total`` the last window holds the rest.

    Examples:
        >>> [plan_window(i, 4, 6) for i in (0, 3, 4, 5)]
        [(0, 0, 4), (0, 3, 4), (1, 0, 2), (1, 1, 2)]
    """
    step, index = divmod(position, steps)
    size = steps if total is None else min(steps, total - step * steps)
    return step, index, max(size, index + 1)


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        msg = (f"accumulate(): steps must be an int >= 1, but got {steps!r}. Use steps=1 for "
               "no accumulation.")
        raise ConfigError(msg)
    return steps


def _pass_length(loader: Iterable[Any], taken: int) -> int | None:
    """Batches this pass yields in all, known once its first batch is out (``taken``).

    A loader with a ``remaining`` count (a sharded loader, whose ``len()`` is the whole
    epoch even when the pass resumes mid-epoch) says what is left of the running pass; other
    loaders are counted with ``len()``; None when neither is known.
    """
    try:
        remaining = getattr(loader, "remaining", None)
        if isinstance(remaining, int) and not isinstance(remaining, bool) and taken:
            return taken + remaining
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def accumulate(loader: Iterable[Any], steps: int = 1) -> Iterator[tuple[Any, MicroStep]]:
    """Yield ``(batch, micro)`` with ``micro.sync`` on each window's last batch.

    A window is ``steps`` batches; the loader's last batch always ends a window, so no
    gradient is left unapplied. `backward` divides each loss by the window's size, so a
    window of ``steps`` half-batches gives the gradient of one batch of twice the size. When
    the loader has no ``len()``, the last window is still closed but divides by ``steps``.

    Args:
        loader: any iterable of batches (a ``DataLoader``, a sharded loader, a list).
        steps: batches per optimizer step.

    Examples:
        >>> [(b, m.sync) for b, m in accumulate("abcde", steps=2)]
        [('a', False), ('b', True), ('c', False), ('d', True), ('e', True)]
    """
    steps = _check_steps(steps)
    it = iter(loader)
    ahead = list(itertools.islice(it, 1))
    total = _pass_length(loader, len(ahead))
    ahead.extend(itertools.islice(it, 1))  # the next two batches tell both syncs ahead
    position = 0
    while ahead:
        batch = ahead.pop(0)
        ahead.extend(itertools.islice(it, 1))
        step, index, size = plan_window(position, steps, total)
        sync = not ahead or index == size - 1
        next_sync = len(ahead) < 2
        if not next_sync:
            _, next_index, next_size = plan_window(position + 1, steps, total)
            next_sync = next_index == next_size - 1
        yield batch, MicroStep(step=step, index=index, size=size, sync=sync,
                               next_sync=next_sync)
        position += 1
