"""The training step's verbs: `backward`, `clip_grad_norm`, `seed` and `autocast`.

Each verb does what every strategy shares (dividing by the accumulation window) and hands the
rest to the model's `Wrapped` (its scaler, its DDP or FSDP2 sync, its DeepSpeed engine), so the
same loop runs under every strategy and precision::

    for batch, micro in dl.accumulate(loader, steps=4):
        loss = loss_fn(model(batch["x"]), batch["y"])
        dl.backward(loss, model, micro)
        if micro.sync:
            dl.clip_grad_norm(model, 1.0)
            optimizer.step(); optimizer.zero_grad()

A plain module (not wrapped) gets plain behaviour.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import torch

from distlib.env import Env
from distlib.errors import ConfigError
from distlib.precision import compute_dtype
from distlib.strategies._validate import OptionTypeError
from distlib.training.accumulation import MicroStep
from distlib.training.wrapped import wrapped_of

__all__ = ["autocast", "backward", "clip_grad_norm", "clip_module", "seed"]


def backward(loss: Any, model: Any, micro: MicroStep | None = None) -> None:
    """Back-propagate ``loss`` the way the model's strategy and precision need.

    Divides the loss by the accumulation window's size, scales it for fp16, and lets the
    strategy skip the gradient sync except on ``micro.sync`` (DDP ``no_sync``, FSDP2
    ``set_requires_gradient_sync``, DeepSpeed's accumulation boundary).

    When ``micro.num_items`` is set (``accumulate(..., count=...)``), ``loss`` must be the
    loss *summed* over this batch's items (``reduction="sum"``): backward divides it by
    ``num_items``, the window's items on every data-parallel rank, instead of by the window's
    size, and multiplies it by the data-parallel size that the strategy's gradient average
    divides by. The step's gradient is then the token mean of the whole global batch. Do not
    divide by ``num_items`` yourself: a loss that ends in a mean or a division is refused.

    Args:
        loss: a scalar tensor (a sum over the items when ``micro.num_items`` is set).
        model: the model returned by ``wrap`` (a plain module works too: plain backward).
        micro: the `MicroStep` from `accumulate`; None means a window of one batch.

    Raises:
        StrategyError: fp16 and a model wrapped without its optimizer.
        ConfigError: ``micro.num_items`` is set and ``loss`` is a mean or already divided.

    Examples:
        >>> import torch, distlib as dl
        >>> model = dl.wrap(torch.nn.Linear(2, 1), dl.Env())
        >>> dl.backward(model(torch.ones(1, 2)).sum(), model)
        >>> model.weight.grad
        tensor([[1., 1.]])

    Effects: accumulates into the parameters' ``.grad``; collectives across the ranks on
    sync steps.
    """
    wrapped = wrapped_of(model)
    if micro is not None and micro.num_items is not None:
        _refuse_a_mean(loss)
        dp_size = 1 if wrapped is None else wrapped.env.mesh.dp_size
        # A window without any item has a zero sum: its gradient is zero, not NaN.
        loss = loss * (dp_size / max(micro.num_items, 1))
    elif micro is not None and micro.size > 1:
        loss = loss / micro.size
    if wrapped is None:
        loss.backward()
        return
    wrapped.backward(loss, micro)


# Autograd's name for the node that made a mean (``.mean()``, ``reduction="mean"``) or a quotient.
_MEAN_NODES = frozenset({"MeanBackward0", "MeanBackward1", "DivBackward0", "DivBackward1"})
_MEAN_REDUCTION = 1  # at::Reduction::Mean, saved by the loss nodes (NllLoss, MseLoss, ...)


def _refuse_a_mean(loss: Any) -> None:
    """Refuse a loss that is already a mean or a quotient when backward divides by num_items."""
    node = getattr(loss, "grad_fn", None)
    if node is None:
        return
    name = node.name()
    if getattr(node, "_saved_reduction", None) == _MEAN_REDUCTION:
        name += " with reduction='mean'"
    elif name not in _MEAN_NODES:
        return
    msg = (f"backward(): loss must be summed over the batch's items when micro.num_items is "
           f"set (accumulate(..., count=...)), but got a loss made by {name} (a mean or a "
           f"division). backward divides by micro.num_items itself: pass e.g. "
           f"F.cross_entropy(logits, labels, reduction=\"sum\", ignore_index=-100), or "
           f"leave count= out of accumulate for per-batch means.")
    raise ConfigError(msg)


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

    Raises:
        StrategyError: fp16 and a model wrapped without its optimizer.

    Examples:
        >>> import torch, distlib as dl
        >>> model = dl.wrap(torch.nn.Linear(2, 1, bias=False), dl.Env())
        >>> dl.backward(model(torch.full((1, 2), 3.0)).sum(), model)
        >>> dl.clip_grad_norm(model, 1.0)
        tensor(4.2426)

    Effects: scales the parameters' gradients in place.
    """
    wrapped = wrapped_of(model)
    if wrapped is None:
        return clip_module(model, max_norm, norm_type)
    return wrapped.clip_grad_norm(max_norm, norm_type)


def clip_module(module: torch.nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip a module's gradients by their total norm (a DTensor norm is made whole first).

    Returns:
        The total norm before clipping.

    Effects: scales the parameters' gradients in place.
    """
    # Under TP + FSDP the gradients are DTensors on different meshes (a split projection on
    # (dp, tp), a norm weight on dp alone): one norm per mesh, made whole, then combined.
    groups: dict[Any, list[torch.nn.Parameter]] = {}
    for p in module.parameters():
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    if not groups:
        return torch.nn.utils.get_total_norm([], norm_type=norm_type)
    norms = []
    for params in groups.values():
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = norms[0] if len(norms) == 1 else torch.nn.utils.get_total_norm(norms, norm_type)
    for params in groups.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def seed(seed: int, env: Env, device_specific: bool = False) -> int:
    """Seed Python's, NumPy's (if installed) and torch's generators on this rank.

    Args:
        seed: the base seed.
        env: this process's Env.
        device_specific: add ``env.rank`` so each rank draws different numbers (dropout,
            augmentation); otherwise every rank gets the same seed.

    Returns:
        The seed used on this rank.

    Raises:
        ConfigError: ``seed`` is not an int (also a ``TypeError``).

    Examples:
        >>> import distlib as dl
        >>> dl.seed(42, dl.Env(rank=3, world_size=4), device_specific=True)
        45

    Effects: reseeds the process-wide generators of ``random``, ``numpy`` and ``torch``
    (all CUDA devices too).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        msg = f"seed(): seed must be an int, but got {seed!r}. Pass e.g. dl.seed(42, env)."
        raise OptionTypeError(msg)
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


@contextlib.contextmanager
def autocast(env: Env) -> Iterator[None]:
    """Run the body in the autocast that a model wrapped under ``env`` uses for its forward.

    For code outside the model — a loss computed on the outputs, a second head, an
    evaluation metric — this is ``torch.autocast(<env's device type>, dtype=<compute dtype>)``
    for ``"bf16"`` and ``"fp16"``, and nothing for ``"no"``. Under ``"fp8"`` distlib runs only
    the model's converted linear layers in float8 (torchao) and everything else in fp32, so
    outside the model this is nothing too. (A DeepSpeed engine casts its inputs instead of
    autocasting; outside it, autocast is the equivalent.) Like Accelerate's
    ``accelerator.autocast()``; nest ``torch.autocast(..., enabled=False)`` for an fp32 island.

    Args:
        env: the `Env` the model was wrapped under (its ``precision`` and ``device``).

    Raises:
        TypeError: ``env`` is not an Env.
        PrecisionError: the Env's precision is unknown.

    Examples:
        >>> import torch, distlib as dl
        >>> with autocast(dl.Env(precision="bf16")):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
        >>> with autocast(dl.Env()):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    if not (hasattr(env, "precision") and hasattr(env, "device")) or isinstance(env, type):
        msg = (f"autocast(): env must be an Env (it gives the precision and the device), but got "
               f"{type(env).__name__}. Pass the Env the model was wrapped under: "
               "dl.autocast(env).")
        raise TypeError(msg)
    dtype = compute_dtype(env.precision)
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(env.device).type, dtype=dtype):
        yield
