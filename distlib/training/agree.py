"""Ranks that decide together: `any_rank`, a flag every rank sees the same, and
`find_executable_batch_size`, a batch size every rank agrees on.

For early stopping, skipping a step or a batch: when one rank's condition holds, every rank
must act, or the next collective hangs. One all-reduce (MAX) of one number over the world.
The batch-size search agrees after each attempt too (fine / ran out / failed), but through
the job's store rather than a collective, so that it can never be paired with one of ``fn``.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import numbers
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar

import torch
import torch.distributed as dist

from distlib import runtime
from distlib.collectives import reduce
from distlib.env import Env
from distlib.errors import CollectiveError
from distlib.topology import Mesh
from distlib.training.memory import empty_device_cache

__all__ = ["any_rank", "find_executable_batch_size"]

P = ParamSpec("P")
T = TypeVar("T")

# What Accelerate's ``should_reduce_batch_size`` looks for in a one-argument RuntimeError
# (accelerate/utils/memory.py): the out-of-memory messages of CUDA / HIP / XPU, MPS, the CPU
# allocator and HPU, and cuDNN's "not supported" (which a smaller batch also avoids).
_OUT_OF_MEMORY_MESSAGES = (
    " out of memory.",
    "MPS backend out of memory",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",
    "DefaultCPUAllocator: can't allocate memory",
    "FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed",
)

# One attempt's outcome on one rank; the agreement keeps the largest over the ranks.
_FINE, _OUT_OF_MEMORY, _FAILED = 0, 1, 2


def any_rank(flag: Any, env: Env) -> bool:
    """True on every rank when any rank passes a true ``flag`` (a bool or a one-element tensor).

    Every rank must call it at the same point (it is a collective). On one process it is
    ``bool(flag)``.

    Examples:
        >>> any_rank(True, Env()), any_rank(torch.tensor(0), Env())
        (True, False)

    Effects: joins the process group on first need; one all-reduce over the whole world,
    on ``env.device``.
    """
    if env.world_size == 1:
        return bool(flag)
    world = dataclasses.replace(env, mesh=Mesh())  # every rank, whatever the mesh
    mine = torch.tensor([1 if bool(flag) else 0], dtype=torch.int32, device=env.device)
    return bool(reduce(mine, world, op="max", check=False).item())


def _is_out_of_memory(exc: BaseException) -> bool:
    """True for the errors a smaller batch can cure: ``torch.OutOfMemoryError`` and the
    one-argument RuntimeErrors whose message Accelerate's ``should_reduce_batch_size``
    recognises (`_OUT_OF_MEMORY_MESSAGES`).

    Examples:
        >>> _is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
        True
        >>> _is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: 9 TB"))
        True
        >>> _is_out_of_memory(ValueError("out of memory."))
        False
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return any(text in exc.args[0] for text in _OUT_OF_MEMORY_MESSAGES)
    return False


def _check_options(fn: Any, env: Any, starting_batch_size: Any, factor: Any) -> None:
    call = "find_executable_batch_size()"
    if not callable(fn):
        msg = (f"{call}: fn must be callable (fn(batch_size, *args, **kwargs)), but got "
               f"{fn!r}. Pass the function itself: find_executable_batch_size(train, env, 128).")
        raise TypeError(msg)
    if not isinstance(env, Env):
        msg = (f"{call}: env must be an Env, but got {type(env).__name__} {env!r}. Pass "
               "dl.detect() (arguments: fn, env, starting_batch_size).")
        raise TypeError(msg)
    if isinstance(starting_batch_size, bool) or not isinstance(starting_batch_size, int) \
            or starting_batch_size < 1:
        msg = (f"{call}: starting_batch_size must be an int >= 1, but got "
               f"{starting_batch_size!r}. Pass the largest batch size to try, e.g. 128.")
        raise ValueError(msg)
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) \
            or not 0 < float(factor) < 1:
        msg = (f"{call}: factor must be a number with 0 < factor < 1, but got {factor!r}. "
               "0.5 halves the size after running out of memory (the default); 0.9 is "
               "Accelerate's current rule.")
        raise ValueError(msg)


def _check_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse a call that passes the batch size itself (as Accelerate's decorator does)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    try:
        sig.bind(1, *args, **kwargs)
    except TypeError:
        try:
            sig.bind(*args, **kwargs)
        except TypeError:
            return  # wrong either way: the call itself raises the usual TypeError
        name = getattr(fn, "__name__", "fn")
        given = ", ".join(map(repr, args))
        msg = (f"find_executable_batch_size(): {name}() must take the batch size as its "
               f"first parameter, filled in by distlib, but got the call "
               f"{name}({given}) that already fills every parameter. "
               + (f"Drop the first argument: call it as {name}("
                  f"{', '.join(map(repr, args[1:]))})." if args else
                  f"Declare it: def {name}(batch_size, ...)."))
        raise TypeError(msg) from None


def _summary(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


class _Agreement:
    """Every rank's outcome of one attempt, read through the job's store (the TCPStore the
    default process group was made with), not with a collective.

    A collective could be paired with one of ``fn`` that another rank is still in (a
    mismatched pair aborts gloo and corrupts or hangs NCCL); the store cannot, touches no
    memory of the device that just ran out, and tells every rank who failed and why. A rank
    whose attempt raised a real error posts it and raises at once without waiting, so that a
    peer still inside a collective of ``fn`` is released when that rank exits (the launcher
    closes its groups) instead of both waiting until the timeout. XLA has no such store: it
    takes the MAX with `reduce` over the world.
    """

    def __init__(self, env: Env) -> None:
        self.env = env
        self.store: Any = None
        self.prefix = ""
        self.attempt = 0
        if env.world_size > 1 and env.backend != "xla":
            runtime.initialize(env)
            self.store = dist.distributed_c10d._get_default_store()
            # each rank counts its own calls: the same count on every rank names this call
            call = self.store.add(f"distlib/batch_size/calls/{env.rank}", 1)
            self.prefix = f"distlib/batch_size/{call}"

    def verdict(self, state: int, summary: str | None) -> tuple[int, list[tuple[int, str]]]:
        """The largest outcome over the ranks, and the ranks that failed with their errors."""
        env = self.env
        if env.world_size == 1:
            return state, [(0, summary)] if summary is not None else []
        if self.store is None:  # XLA
            world = dataclasses.replace(env, mesh=Mesh())
            mine = torch.tensor([state], dtype=torch.int32, device=env.device)
            most = int(reduce(mine, world, op="max", check=False).item())
            return most, [(-1, "an error (see that rank's traceback)")] if most == _FAILED else []
        keys = [f"{self.prefix}/{self.attempt}/{rank}" for rank in range(env.world_size)]
        self.attempt += 1
        self.store.set(keys[env.rank], f"{state}\n{summary or ''}")
        if state == _FAILED:
            return state, []  # this rank raises its own error now, without waiting
        self.store.wait(keys, timedelta(seconds=env.timeout_s))
        posted = [bytes(self.store.get(key)).decode().split("\n", 1) for key in keys]
        failed = [(rank, text) for rank, (code, text) in enumerate(posted)
                  if int(code) == _FAILED]
        return max(int(code) for code, _ in posted), failed


def _free() -> None:
    gc.collect()
    empty_device_cache()


def find_executable_batch_size(
    fn: Callable[Concatenate[int, P], T], env: Env, starting_batch_size: int = 128, *,
    factor: float = 0.5,
) -> Callable[P, T]:
    """Retry ``fn`` with a smaller batch size when any rank runs out of memory; all ranks agree.

    ``train = find_executable_batch_size(train, env, 128)``, then ``train(model, optimizer)``
    calls ``train(batch_size, model, optimizer)``, as Accelerate's decorator does. When an
    attempt raises an out-of-memory error (``torch.OutOfMemoryError``, or a RuntimeError with
    a message Accelerate's ``should_reduce_batch_size`` recognises) memory is freed (garbage
    collection and the device cache) and ``fn`` runs again at ``int(batch_size * factor)``.
    After every attempt all ranks exchange one number (ran out / failed / fine, MAX over the
    world): when any rank ran out, every rank retries at the same smaller size, also the ranks
    whose attempt succeeded, so the ranks never disagree on the size (Accelerate's decorator
    decides per process, and ranks that disagree hang). Any other error still propagates:
    the rank that raised it re-raises it at once, without waiting, and every rank that
    reaches the verdict raises a `CollectiveError` naming that rank and its error.

    The default ``factor=0.5`` halves, as the issue asks and Accelerate documented before;
    Accelerate 1.x multiplies by 0.9 (``int(batch_size * 0.9)``): pass ``factor=0.9`` for its
    exact sequence. A later call starts from the size the previous call ended at (the size
    that worked, or the one an error was raised at), as Accelerate's does.

    An out-of-memory error on one rank while another rank is inside a collective of ``fn``
    (DDP's gradient all-reduce in the backward) cannot be rescued: that rank waits in its
    collective and never reaches the agreement; see "A batch size every rank agrees on" in
    the training guide for what happens then and how to write ``fn``.

    Args:
        fn: ``fn(batch_size, *args, **kwargs)``; one attempt, which must be safe to repeat.
        env: this process's Env.
        starting_batch_size: the first size tried.
        factor: each next size is ``int(size * factor)``; 0 < factor < 1.

    Returns:
        ``run(*args, **kwargs)``: ``fn``'s result at the first size every rank ran.

    Raises:
        TypeError: ``fn`` not callable, ``env`` not an Env, or a call that passes the batch
            size itself.
        ValueError: ``starting_batch_size`` or ``factor`` out of range.
        RuntimeError: out of memory at every size down to 1; the message lists them.
        CollectiveError: another rank's attempt raised an error that is not out-of-memory.

    Examples:
        >>> def train(batch_size, tried):
        ...     tried.append(batch_size)
        ...     if batch_size > 20:
        ...         raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        ...     return batch_size
        >>> tried = []
        >>> find_executable_batch_size(train, Env(), 128)(tried), tried
        (16, [128, 64, 32, 16])
        >>> find_executable_batch_size(train, Env(), 100, factor=0.9)([])
        19

    Effects: runs ``fn`` once or more; ``gc.collect()`` and `empty_device_cache` before the
    first attempt and after each out-of-memory error; on more than one rank, joins the
    process group and, per attempt, writes one key to the job's store and reads every rank's
    (on XLA: one all-reduce of one number).
    """
    _check_options(fn, env, starting_batch_size, factor)
    start = starting_batch_size

    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        nonlocal start
        _free()  # what an earlier run left, as Accelerate's decorator does
        agreement = _Agreement(env)
        size, tried = start, []
        while True:
            tried.append(size)
            start = size  # where a later call starts: the size that worked or raised
            result, verdict = _attempt(fn, size, agreement, args, kwargs)
            if verdict == _FINE:
                return result  # type: ignore[no-any-return]
            size = int(size * factor)
            if size == 0:
                start = starting_batch_size
                msg = (f"find_executable_batch_size(): a batch size must be >= 1, but got "
                       f"0 after running out of memory at every size tried: "
                       f"{', '.join(map(str, tried))} (factor {factor}). Free memory "
                       "before the call (dl.free_memory), shorten the sequences or "
                       "shrink the model, or check that fn uses batch_size.")
                raise RuntimeError(msg)

    run.__name__ = getattr(fn, "__name__", "run")
    run.__qualname__ = getattr(fn, "__qualname__", "run")
    run.__doc__ = getattr(fn, "__doc__", None)
    return run


def _attempt(fn: Callable[..., T], size: int, agreement: _Agreement, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> tuple[Any, int]:
    """Run fn at ``size`` on this rank, then take part in every rank's verdict on it."""
    result: Any = None
    failure: Exception | None = None
    state = _FINE
    try:
        _check_call(fn, args, kwargs)
        result = fn(size, *args, **kwargs)
    except Exception as exc:  # every rank must hear of it before it propagates
        if _is_out_of_memory(exc):
            state = _OUT_OF_MEMORY  # the error (its frames hold the tensors) goes here
        else:
            state, failure = _FAILED, exc
    if state == _OUT_OF_MEMORY:
        _free()
    try:
        verdict, failed = agreement.verdict(state, None if failure is None else _summary(failure))
    except Exception as exc:
        if failure is not None:
            raise failure  # noqa: B904 - the user's error, as it is
        msg = (f"find_executable_batch_size(): every rank must report how its attempt at "
               f"batch_size={size} ended, but got {_summary(exc)} while this rank waited for "
               "the others. A rank still inside a collective of fn (such as DDP's gradient "
               "all-reduce, when a rank ran out of memory before it) never reports: run "
               "the step so that every rank leaves it together (see the training guide).")
        raise CollectiveError(msg) from exc
    if failure is not None:
        raise failure  # unchanged, with its traceback: the other ranks name it
    if verdict == _OUT_OF_MEMORY and state == _FINE:  # another rank ran out: retry here too
        result = None
        _free()
    if verdict != _FAILED:
        return result, verdict
    who = "; ".join(f"rank {rank}: {text}" if rank >= 0 else text for rank, text in failed)
    msg = (f"find_executable_batch_size(): every rank's attempt must succeed or run out of "
           f"memory, but at batch_size={size} got {who}. This rank stops too, so that no "
           "rank waits for another; the cause is in that rank's traceback.")
    raise CollectiveError(msg)
