"""Accumulation windows: `MicroStep` and `accumulate`.

`accumulate` tells each batch where it sits in its window; `backward` divides by the window's
size (or, when ``accumulate`` counts tokens, by the window's token count over the data-parallel
ranks) and lets the strategy skip the gradient sync except on a window's last batch. The
window plan is pure; counting is the one effect (one all-reduce per window).
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from distlib.collectives import reduce
from distlib.env import Env, detect
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
        num_items: the valid items (tokens) of the whole window, summed over this window's
            batches on every data-parallel rank, when ``accumulate(..., count=...)`` counts
            them; None otherwise. ``loss_sum / num_items`` is the token mean of the window's
            global batch; `backward` then divides a summed loss by it (and not by ``size``).

    Examples:
        >>> MicroStep(step=0, index=1, size=2, sync=True, next_sync=False).sync
        True
        >>> MicroStep(step=0, index=0, size=1, sync=True, num_items=37).num_items
        37
    """

    step: int
    index: int
    size: int
    sync: bool
    next_sync: bool = True
    num_items: int | None = None

    def __post_init__(self) -> None:
        for name in ("step", "index", "size", "num_items"):
            value = getattr(self, name)
            if name == "num_items" and value is None:
                continue
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


Count = Callable[[Any], Any]

_COUNT_FIX = ('Return the batch\'s valid items, e.g. count=lambda b: (b["labels"] != -100).sum() '
              "(padding labelled -100).")


def accumulate(loader: Iterable[Any], steps: int = 1, *, count: Count | None = None,
               env: Env | None = None) -> Iterator[tuple[Any, MicroStep]]:
    """Yield ``(batch, micro)`` with ``micro.sync`` on each window's last batch.

    A window is ``steps`` batches; the loader's last batch always ends a window, so no
    gradient is left unapplied. `backward` divides each loss by the window's size, so a
    window of ``steps`` half-batches gives the gradient of one batch of twice the size. When
    the loader has no ``len()``, the last window is still closed but divides by ``steps``.

    **Counting tokens.** With padding, batches hold different numbers of valid tokens and the
    mean of per-batch means is not the token mean. With ``count``, ``accumulate`` reads each
    window ahead, calls ``count(batch)`` on its batches, and sums the counts over the window
    and over the data-parallel ranks (one all-reduce per window, `distlib.reduce` with
    ``op="sum"``): every micro-step of the window carries that total as ``micro.num_items``.
    Pass `backward` the loss *summed* over the batch's tokens (``reduction="sum"``); it
    divides by ``num_items`` (and not by the window's size), so the step's gradient is the
    token mean of the whole global batch. The window's batches are held in memory meanwhile.

    Args:
        loader: any iterable of batches (a ``DataLoader``, a sharded loader, a list).
        steps: batches per optimizer step.
        count: ``count(batch) -> int`` (or a one-element integer tensor): the batch's valid
            items, e.g. ``lambda b: (b["labels"] != -100).sum()``. None: no counting.
        env: the Env whose data-parallel ranks share the count; default: the loader's own
            (a `shard`-ed loader), else `detect`. Only used with ``count``.

    Raises:
        ConfigError: ``steps`` is not an int >= 1, ``count`` is not callable, or ``count``
            returns something that is not a count (also a ``ValueError``).

    Examples:
        >>> [(b, m.sync) for b, m in accumulate("abcde", steps=2)]
        [('a', False), ('b', True), ('c', False), ('d', True), ('e', True)]
        >>> [(b, m.num_items) for b, m in accumulate(["ab", "c", "def"], 2, count=len,
        ...                                          env=Env())]
        [('ab', 3), ('c', 3), ('def', 3)]
    """
    steps = _check_steps(steps)
    if count is None:
        return _plain(loader, steps)
    if not callable(count):
        msg = (f"accumulate(): count must be a function count(batch) -> int, but got "
               f"{count!r}. {_COUNT_FIX}")
        raise ConfigError(msg)
    if env is None:
        own = getattr(loader, "env", None)
        env = own if isinstance(own, Env) else detect()
    return _counted(loader, steps, count, env)


def _plain(loader: Iterable[Any], steps: int) -> Iterator[tuple[Any, MicroStep]]:
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


def _counted(loader: Iterable[Any], steps: int, count: Count,
             env: Env) -> Iterator[tuple[Any, MicroStep]]:
    """Windows read whole before their first batch is yielded, each with its global count."""
    it = iter(loader)
    ahead = list(itertools.islice(it, steps + 1))  # a window and the next one's first batch
    step = 0
    while ahead:
        window = ahead[:steps]
        num_items = _count_window(window, count, env, step)
        ahead = ahead[steps:]
        ahead.extend(itertools.islice(it, steps + 1 - len(ahead)))
        size = len(window)
        for index, batch in enumerate(window):
            # After a window's last batch, the next window's first batch ends that window
            # when it holds one batch (one left, or steps == 1).
            last = index == size - 1
            next_sync = (len(ahead) <= 1 or steps == 1) if last else index == size - 2
            yield batch, MicroStep(step=step, index=index, size=size, sync=last,
                                   next_sync=next_sync, num_items=num_items)
        step += 1


def _count_window(window: list[Any], count: Count, env: Env, step: int) -> int:
    """The window's valid items on every data-parallel rank: one all-reduce."""
    counts = []
    for index, batch in enumerate(window):
        value = count(batch)
        number = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        integral = number or (
            isinstance(value, torch.Tensor) and value.numel() == 1
            and not value.is_floating_point() and not value.is_complex())
        if not integral or (number and value < 0):
            shown = (f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
                     if isinstance(value, torch.Tensor) else repr(value))
            msg = (f"accumulate(): count(batch) must return an int >= 0 or a one-element "
                   f"integer tensor, but got {shown} for batch {index} of window {step}. "
                   f"{_COUNT_FIX}")
            raise ConfigError(msg)
        counts.append(torch.as_tensor(value).reshape(()).to(torch.int64))
    local = torch.stack([c.to(env.torch_device) for c in counts]).sum()
    total = int(reduce(local, env, op="sum").item())
    if total < 0:
        msg = (f"accumulate(): count(batch) must return counts >= 0, but the counts of window "
               f"{step} sum to {total}. {_COUNT_FIX}")
        raise ConfigError(msg)
    return total
