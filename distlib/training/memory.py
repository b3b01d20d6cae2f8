"""Giving a run's memory back between runs: `free_memory` (Accelerate's ``release_memory``).

A wrapped model holds its pieces on itself (its `Wrapped`: grad scaler, DDP wrapper, DeepSpeed
engine), never in a registry, so dropping the user's references and collecting is what frees
them; what a strategy holds outside Python's view (a DeepSpeed engine's buffers) goes with
``Wrapped.release()``. This module does both, then returns the accelerator's cached blocks.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

from distlib.training.wrapped import owner_of, wrapped_of

__all__ = ["empty_device_cache", "free_memory"]


def _release(obj: Any, released: set[int]) -> None:
    """Release the `Wrapped` of a wrapped model or of its optimizer view (once each)."""
    wrapped = wrapped_of(obj)
    if wrapped is None:
        wrapped = owner_of(obj)
    if wrapped is not None and id(wrapped) not in released:
        released.add(id(wrapped))
        wrapped.release()


def empty_device_cache() -> None:
    """Hand the caching allocator's free blocks back to the device (CUDA, XPU, MPS).

    Only a device this process already started is touched (no CUDA initialisation here).
    XLA has no such cache: its buffers go when the last tensor referring to them does
    (pytorch/xla#7824), which `free_memory`'s collection takes care of.

    Examples:
        >>> empty_device_cache()  # on a CPU-only machine: nothing to do

    Effects: ``torch.cuda.empty_cache()`` (and the XPU / MPS equivalents) where in use.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available() and xpu.is_initialized():
        xpu.empty_cache()
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        torch.mps.empty_cache()


def free_memory(*objects: Any) -> list[None]:
    """Release wrapped models, optimizers, schedulers and tensors; return Nones to rebind.

    Rebind the names to the result (``model, optimizer = dl.free_memory(model,
    optimizer)``): an object is freed when its last reference goes, and the caller's names
    are references. For each model distlib wrapped (or its optimizer view), its `Wrapped` is
    released: a DeepSpeed engine is destroyed, and what distlib hung on the model is taken off
    (the Wrapped with the scaler, DDP wrapper, engine and optimizer view; the autocast
    forward), which breaks the reference cycles those made: once
    the names are rebound, reference counting frees a `Single` or `DDP` model at once,
    without waiting for the garbage collector. Then the garbage collector runs (earlier
    cycles) and the accelerator's cache is emptied (`empty_device_cache`), as Accelerate's
    ``release_memory`` does. FSDP2 and DeepSpeed keep cycles of their own inside a wrapped
    model, which only the garbage collector frees, and the caller's names still hold the
    objects during this call: call ``free_memory()`` once more, without arguments, after the
    rebinding to collect them and hand their memory back to the device now.

    Args:
        *objects: what to release: models returned by ``wrap``, optimizers, schedulers,
            tensors, anything.

    Returns:
        ``[None] * len(objects)``, to assign back to the same names.

    Examples:
        >>> import torch, distlib as dl
        >>> model, optimizer = dl.wrap(torch.nn.Linear(2, 2), dl.Env(),
        ...                            optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1))
        >>> model, optimizer = free_memory(model, optimizer)
        >>> model, optimizer
        (None, None)

    Effects: ``Wrapped.release()`` for each wrapped model or optimizer view passed (DeepSpeed:
    ``engine.destroy()``); the models are plain modules after;
    runs ``gc.collect()``; empties the CUDA / XPU / MPS cache.
    """
    released: set[int] = set()
    for index in range(len(objects)):
        _release(objects[index], released)
    gc.collect()
    empty_device_cache()
    return [None] * len(objects)
