"""Giving a run's memory back between runs: `free_memory` (Accelerate's ``release_memory``).

A wrapped model holds its pieces on itself (its `Handle`: grad scaler, DDP wrapper, DeepSpeed
engine), never in a registry, so dropping the user's references and collecting is what frees
them; a DeepSpeed engine also holds buffers outside Python's view, released by its
``destroy()``. This module does both, then returns the accelerator's cached blocks.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

__all__ = ["empty_device_cache", "free_memory"]

_HANDLE_SLOTS = ("ddp", "engine", "fsdp", "optimizer", "scaler")


def _engine_of(obj: Any) -> Any:
    from distlib.strategies._handle import EngineOptimizer, handle_of

    handle = handle_of(obj)
    if handle is not None:
        return handle.engine
    return obj.engine if isinstance(obj, EngineOptimizer) else None


def _drop_autocast(obj: Any) -> None:
    """Remove an `AutocastForward` set on this instance (it refers back to the object)."""
    from distlib.precision import AutocastForward

    if isinstance(getattr(obj, "__dict__", {}).get("forward"), AutocastForward):
        del obj.forward


def _release(obj: Any, destroyed: set[int]) -> None:
    """Destroy the object's DeepSpeed engine (once) and undo what distlib hung on it."""
    from distlib.strategies._handle import ATTRIBUTE, handle_of

    engine = _engine_of(obj)
    if engine is not None and id(engine) not in destroyed:
        destroyed.add(id(engine))
        engine.destroy()
    handle = handle_of(obj)
    if handle is None:
        return
    for target in (obj, handle.module):
        _drop_autocast(target)
    for slot in _HANDLE_SLOTS:
        setattr(handle, slot, None)
    object.__delattr__(obj, ATTRIBUTE)


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
    are references. For each object distlib wrapped, its DeepSpeed engine is destroyed and
    what distlib hung on it is taken off (its handle with the scaler, DDP wrapper, engine and
    optimizer view; the autocast forward), which breaks the reference cycles those made: once
    the names are rebound, reference counting frees the objects at once, without waiting for
    the garbage collector. Then the garbage collector runs (earlier cycles) and the
    accelerator's cache is emptied (`empty_device_cache`), as Accelerate's
    ``release_memory`` does. The memory of the objects passed returns to the allocator when
    the names are rebound; to hand it to the device too, call ``dl.free_memory()`` (no
    arguments) after that.

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

    Effects: calls ``engine.destroy()`` on DeepSpeed engines; removes distlib's handle and
    autocast forward from the wrapped objects passed (they are plain modules after);
    runs ``gc.collect()``; empties the CUDA / XPU / MPS cache.
    """
    destroyed: set[int] = set()
    for index in range(len(objects)):
        _release(objects[index], destroyed)
    gc.collect()
    empty_device_cache()
    return [None] * len(objects)
