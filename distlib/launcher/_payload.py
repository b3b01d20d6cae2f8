"""Ship a callable and its arguments to the ranks, and each rank's result back: cloudpickle.

Functions and classes a fresh interpreter can import by name (defined at module level in an
importable module, a test file included) travel by reference, as pickle does. What it cannot
import — defined in ``__main__`` (a notebook, a REPL, ``python -c``, a script calling
``launch()``), lambdas, local functions, and the classes they use (an ``nn.Module`` subclass or a
dataclass typed into a notebook cell) — travels by value, with the globals it uses: cloudpickle
does that for ``__main__`` without being asked (``cloudpickle.register_pickle_by_value`` is for
whole modules, which we do not need). A class shipped by value comes back as the same class:
``launch(train, Config(...))`` returns ``Config`` instances equal to the caller's. Code shipped
by value keeps its file name (cloudpickle writes ``<dynamic-code>``), so a rank's traceback,
the launcher's root-cause report, points at the user's script or notebook cell and line.

Trust: `loads` runs whatever the pickle says, so it only ever reads the launcher's own files:
the payload that ``launch()`` wrote for its ranks and the results its ranks wrote back, both in
the launcher's private work folder, written and read by the same user's processes in one job.
Files from elsewhere (checkpoints, weights) never come here; they go through
``distlib._safe_unpickle`` and ``weights_only=True``.
"""

from __future__ import annotations

import functools
import io
import pickle
import types
from collections import ChainMap
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import cloudpickle  # type: ignore[import-untyped]  # ships no type information

from distlib.errors import LaunchError

__all__ = ["dumps", "loads"]

_CALL_FIX = ("Build it inside the target (each rank makes its own: a model, a loader, a "
             "writer, a lock), or pass what it is built from (a path, a config).")
_RESULT_FIX = ("Return plain values (numbers, strings, tensors, dicts and lists of them), "
               "not live objects such as files, locks, generators or process groups.")


def _code_with_filename(rebuild: Callable[..., types.CodeType], args: tuple[Any, ...],
                        filename: str) -> types.CodeType:
    return rebuild(*args).replace(co_filename=filename)


def _reduce_code(code: types.CodeType) -> tuple[Any, ...]:
    rebuild, args = cloudpickle.Pickler.dispatch_table[types.CodeType](code)
    return _code_with_filename, (rebuild, args, code.co_filename)


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle is untyped
    """cloudpickle's pickler, keeping the file name of code shipped by value."""

    dispatch_table: ClassVar[ChainMap[Any, Any]] = ChainMap(
        {types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _picklable(obj: Any) -> bool:
    try:
        _dumps(obj)
    except Exception:  # pickling runs arbitrary __reduce__ code
        return False
    return True


def _parts(obj: Any, where: str, context: str) -> Iterator[tuple[Any, str, str]]:
    """The pieces pickling ``obj`` pickles: each with an expression and what it is part of."""
    if isinstance(obj, (tuple, list)):
        yield from ((item, f"{where}[{i}]", context) for i, item in enumerate(obj))
    elif isinstance(obj, dict):
        yield from ((value, f"{where}[{key!r}]", context) for key, value in obj.items())
    elif isinstance(obj, functools.partial):
        yield obj.func, f"{where}.func", context
        yield from ((a, f"{where}.args[{i}]", context) for i, a in enumerate(obj.args))
        yield from ((v, f"{where}.keywords[{k!r}]", context) for k, v in obj.keywords.items())
    elif isinstance(obj, types.MethodType):
        yield obj.__self__, f"{where}.__self__", context
    elif isinstance(obj, types.FunctionType):
        function = obj.__qualname__
        yield from ((obj.__globals__[name], name, f"a global that `{function}` uses")
                    for name in sorted(_global_names(obj.__code__)) if name in obj.__globals__)
        cells = zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False)
        yield from ((cell.cell_contents, name, f"a variable that `{function}` captures")
                    for name, cell in cells)
    elif not isinstance(obj, type) and isinstance(getattr(obj, "__dict__", None), dict):
        yield from ((value, f"{where}.{name}", context) for name, value in vars(obj).items())


def _global_names(code: types.CodeType) -> set[str]:
    """Global names a code object (and the code nested in it) may look up."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _culprit(obj: Any, where: str, context: str, depth: int = 0) -> tuple[Any, str, str]:
    """The innermost piece of ``obj`` that cannot be pickled, its expression and context."""
    if depth < 8:
        for part, expr, inside in _parts(obj, where, context):
            if part is not obj and not _picklable(part):
                return _culprit(part, expr, inside, depth + 1)
    return obj, where, context


def _refusal(obj: Any, exc: Exception) -> LaunchError:
    if (isinstance(obj, tuple) and len(obj) == 2 and callable(obj[0])
            and isinstance(obj[1], tuple)):  # launch() ships (target, args)
        what, fix = "the target and its arguments", _CALL_FIX
        culprit, expr, context = _culprit(obj[1], "args", "an argument launch() passes to the target")
        if not _picklable(obj[0]):
            culprit, expr, context = _culprit(obj[0], "target", "launch()'s target")
    else:  # a rank's result
        what, fix = "what a rank returns", _RESULT_FIX
        culprit, expr, context = _culprit(obj, "value", "the value the target returned")
    msg = (f"launch(): `{expr}` ({context}) must be picklable (cloudpickle ships {what} "
           f"between the launcher and the ranks), but got a `{type(culprit).__qualname__}`: "
           f"{type(exc).__name__}: {exc}. {fix}")
    return LaunchError(msg)


def dumps(obj: Any) -> bytes:
    """Serialise ``obj`` (``(target, args)`` for the ranks, or a rank's result) with cloudpickle.

    Args:
        obj: what to ship; what ``__main__`` defines travels by value, the rest by reference.

    Returns:
        The pickle's bytes, for `loads` in another process of the same job.

    Raises:
        LaunchError: a piece of ``obj`` cannot be pickled; the message names it (the target,
            an argument, a global the target uses, an attribute) and says what to do instead.

    Example:
        >>> loads(dumps((len, ([1, 2],))))
        (<built-in function len>, ([1, 2],))
        >>> loads(dumps(lambda x: x + 1))(1)
        2
    """
    try:
        return _dumps(obj)
    except Exception as exc:  # pickling runs arbitrary __reduce__ code
        raise _refusal(obj, exc) from None  # the message names the cause


def loads(data: bytes) -> Any:
    """Read what `dumps` wrote (trusted input only: the launcher's own payload and results).

    Example:
        >>> loads(dumps({"rank": 0}))
        {'rank': 0}
    """
    return pickle.loads(data)  # the launcher's own file (module docstring)
