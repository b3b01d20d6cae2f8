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


def _leave_zero3_stack(engine: Any) -> None:
    """Take the engine's modules off ZeRO-3's module-level forward stack.

    DeepSpeed (0.19) pushes a module on ``parameter_offload.FWD_MODULE_STACK`` in its forward
    pre-hook and can leave the root there after the forward; that global list then keeps the
    whole model alive after ``engine.destroy()`` (found by `free_memory`'s test).
    """
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    stack = getattr(offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list) and stack:
        mine = {id(m) for m in engine.module.modules()}
        stack[:] = [m for m in stack if id(m) not in mine]


def _lru_caches(value: Any, depth: int = 0) -> list[Any]:
    """The ``functools.lru_cache`` wrappers in ``value`` or in its closure (decorators)."""
    if hasattr(value, "cache_clear"):
        return [value]
    found: list[Any] = []
    for cell in (getattr(value, "__closure__", None) or ()) if depth < 3 else ():
        try:
            found += _lru_caches(cell.cell_contents, depth + 1)
        except ValueError:  # an empty cell
            continue
    return found


def _clear_zero3_caches() -> None:
    """Empty the method caches of ZeRO-3's parameter coordinator.

    DeepSpeed (0.19) decorates a ``PartitionedParameterCoordinator`` method with a class-level
    ``functools.lru_cache`` keyed by ``(coordinator, submodule, step)``: it keeps every
    engine's coordinator and submodules alive for the life of the process. Emptying it costs
    other live engines one recomputation per key, nothing else.
    """
    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    cls = getattr(coordinator, "PartitionedParameterCoordinator", None)
    for value in vars(cls).values() if cls is not None else ():
        for cache in _lru_caches(value):
            cache.cache_clear()


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
        _leave_zero3_stack(engine)
        engine.destroy()
        _clear_zero3_caches()
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
