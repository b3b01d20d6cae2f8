"""The training step: `accumulate`, `backward`, `clip_grad_norm` and `seed`.

Each function reads what it needs from the wrapped model's handle (its strategy, scaler or
DeepSpeed engine), so the same loop runs under every strategy and precision::

    for batch, micro in dl.accumulate(loader, steps=4):
        loss = loss_fn(model(batch["x"]), batch["y"])
        dl.backward(loss, model, micro)
        if micro.sync:
            dl.clip_grad_norm(model, 1.0)
            optimizer.step(); optimizer.zero_grad()

`MicroStep` and the window arithmetic are pure; torch is imported only when called.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from distlib.errors import StrategyError

__all__ = [
    "MicroStep", "accumulate", "backward", "check_training", "clip_grad_norm", "plan_window",
    "seed",
]


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
                msg = f"MicroStep(): {name} must be an int >= 0, but got {value!r}."
                raise ValueError(msg)
        if not 0 <= self.index < max(self.size, 1):
            msg = (f"MicroStep(): index must be in [0, size), but got index={self.index}, "
                   f"size={self.size}.")
            raise ValueError(msg)


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
        raise ValueError(msg)
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


def _ddp_allreduce(ddp: Any) -> None:
    """Average gradients by hand when the forward ran without DDP's sync preparation."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in ddp.module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def backward(loss: Any, model: Any, micro: MicroStep | None = None) -> None:
    """Back-propagate ``loss`` the way the model's strategy and precision need.

    Divides the loss by the accumulation window's size, scales it for fp16, and lets the
    strategy skip the gradient sync except on ``micro.sync`` (DDP ``no_sync``, FSDP2
    ``set_requires_gradient_sync``, DeepSpeed's accumulation boundary).

    Args:
        loss: a scalar tensor.
        model: the model returned by ``wrap`` (a plain module works too: plain backward).
        micro: the `MicroStep` from `accumulate`; None means a window of one batch.

    Examples:
        >>> import torch, distlib as dl
        >>> model = dl.wrap(torch.nn.Linear(2, 1), dl.Env())
        >>> dl.backward(model(torch.ones(1, 2)).sum(), model)
        >>> model.weight.grad
        tensor([[1., 1.]])

    Effects: accumulates into the parameters' ``.grad``; collectives across the ranks on
    sync steps.
    """
    from distlib.strategies._handle import handle_of

    sync = micro is None or micro.sync
    if micro is not None and micro.size > 1:
        loss = loss / micro.size
    handle = handle_of(model)
    if handle is None:
        loss.backward()
        return
    if handle.engine is not None:
        handle.engine.set_gradient_accumulation_boundary(sync)
        handle.engine.backward(loss, scale_wrt_gas=False)
        return
    if handle.scaler is not None:
        if handle.optimizer is None:
            msg = ("backward(): under fp16 the optimizer must be passed to wrap() (its step "
                   "has to go through the grad scaler), but got a model wrapped without one. "
                   "Use wrap(model, env, optimizer=opt).")
            raise StrategyError(msg)
        loss = handle.scaler.scale(loss)
    if handle.fsdp is not None:
        handle.fsdp.set_requires_gradient_sync(sync)
    ddp = handle.ddp
    prepared = ddp is None or ddp.require_forward_param_sync
    loss.backward()
    if ddp is not None:
        if sync and not prepared:
            _ddp_allreduce(ddp)
        ddp.require_backward_grad_sync = micro is None or micro.next_sync


def clip_grad_norm(model: Any, max_norm: float, norm_type: float = 2.0) -> Any:
    """Clip the gradients of a wrapped model to a total norm of ``max_norm``.

    Under fp16 the gradients are unscaled first (once per step). FSDP2's DTensor gradients
    are clipped by their global norm. DeepSpeed clips inside its own step: this sets the
    engine's clipping to ``max_norm`` and returns None.

    Args:
        model: the model returned by ``wrap`` (or a plain module).
        max_norm: the largest total gradient norm allowed.
        norm_type: the p of the p-norm.

    Returns:
        The total norm before clipping (a tensor), or None under DeepSpeed.

    Examples:
        >>> import torch, distlib as dl
        >>> model = dl.wrap(torch.nn.Linear(2, 1, bias=False), dl.Env())
        >>> dl.backward(model(torch.full((1, 2), 3.0)).sum(), model)
        >>> dl.clip_grad_norm(model, 1.0)
        tensor(4.2426)

    Effects: scales the parameters' gradients in place.
    """
    import torch

    from distlib.strategies._handle import handle_of

    handle = handle_of(model)
    if handle is not None and handle.engine is not None:
        _set_engine_clipping(handle.engine, max_norm)
        return None
    if handle is not None and handle.scaler is not None and not handle.unscaled:
        if handle.optimizer is None:
            msg = ("clip_grad_norm(): under fp16 the optimizer must be passed to wrap(), but "
                   "got a model wrapped without one. Use wrap(model, env, optimizer=opt).")
            raise StrategyError(msg)
        handle.scaler.unscale_(handle.optimizer.optimizer)
        handle.unscaled = True
    module = handle.module if handle is not None else model
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(
        [p for p in module.parameters() if p.grad is not None], max_norm, total)
    return total


def _set_engine_clipping(engine: Any, max_norm: float) -> None:
    engine._config.gradient_clipping = float(max_norm)
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = float(max_norm)


def seed(seed: int, env: Any, device_specific: bool = False) -> int:
    """Seed Python's, NumPy's (if installed) and torch's generators on this rank.

    Args:
        seed: the base seed.
        env: this process's Env.
        device_specific: add ``env.rank`` so each rank draws different numbers (dropout,
            augmentation); otherwise every rank gets the same seed.

    Returns:
        The seed used on this rank.

    Examples:
        >>> import distlib as dl
        >>> dl.seed(42, dl.Env(rank=3, world_size=4), device_specific=True)
        45

    Effects: reseeds the process-wide generators of ``random``, ``numpy`` and ``torch``
    (all CUDA devices too).
    """
    import random

    import torch

    if isinstance(seed, bool) or not isinstance(seed, int):
        msg = f"seed(): seed must be an int, but got {seed!r}."
        raise TypeError(msg)
    value = seed + env.rank if device_specific else seed
    random.seed(value)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(value % 2**32)
    torch.manual_seed(value)
    return value


def _full_weights(model: Any) -> dict[str, Any]:
    """The model's parameters as whole fp32 tensors (FSDP2 DTensors and ZeRO-3 gathered)."""
    import contextlib

    from distlib.strategies.base import unwrap

    inner = unwrap(model)
    params = list(inner.parameters())
    gathered: Any = contextlib.nullcontext()
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params)
    with gathered:
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().clone()
                for k, v in inner.named_parameters()}


def _check_run(strategy: Any, env: Any, batches: list[Any]) -> dict[str, Any]:
    import torch

    from distlib.strategies.base import wrap

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = wrap(model, strategy, env=env, optimizer=opt)
    for (x, y), micro in accumulate(batches, steps=2):
        out = model(x.to(env.device))
        backward(torch.nn.functional.mse_loss(out, y.to(env.device)), model, micro)
        if micro.sync:
            clip_grad_norm(model, 1.0)
            opt.step()
            opt.zero_grad()
    return _full_weights(model)


def check_training(env: Any) -> str:
    """`distlib test` check: 4 steps of the configured strategy and precision match one process.

    Each rank trains on its slice of the same global batches (2 micro-batches per step); the
    weights must equal those of `Single` trained on the whole batches in this process.
    """
    import torch

    from distlib.strategies.single import Single

    g = torch.Generator().manual_seed(1)
    rows = 4 * env.world_size  # rows of one global micro-batch; 4 per rank
    x, y = torch.randn(8 * rows, 8, generator=g), torch.randn(8 * rows, 1, generator=g)
    whole = list(zip(torch.split(x, rows), torch.split(y, rows), strict=True))
    mine = [(bx[4 * env.rank:4 * env.rank + 4], by[4 * env.rank:4 * env.rank + 4])
            for bx, by in whole]
    got = _check_run(env.strategy, env, mine)
    want = _check_run(Single(), env, whole)
    tol = 1e-5 if str(env.precision) == "no" else 3e-2
    worst = max(float((got[k].cpu() - want[k].cpu()).abs().max()) for k in want)
    assert worst <= tol, f"{env.strategy.name}/{env.precision}: max weight difference {worst:.2e}"
    return f"{env.strategy.name}/{env.precision}: 4 steps match 1 process (diff {worst:.1e})"
