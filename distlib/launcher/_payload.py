"""Ship a callable and its arguments to the ranks: pickle, plus code objects for ``__main__``.

Functions importable by name (defined at module level in a module or a test file) travel by
reference, as pickle does. Functions the ranks cannot import by name — defined in ``__main__``
(a REPL, a notebook, a script calling ``launch()``), lambdas, local functions — travel as
code objects instead (marshal; every rank runs the same interpreter), with the globals they
use: modules by name, other values by pickle.
"""

from __future__ import annotations

import builtins
import importlib
import io
import marshal
import pickle
import sys
import types
from typing import Any

__all__ = ["dumps", "loads"]


def _names(code: types.CodeType) -> set[str]:
    """Global names a code object (and the code nested in it) may look up."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _rebuild_function(code_bytes: bytes, name: str, defaults: Any, kwdefaults: Any,
                      modules: dict[str, str], values: dict[str, Any],
                      closure: tuple[Any, ...] | None) -> types.FunctionType:
    scope: dict[str, Any] = {"__builtins__": builtins, "__name__": "__distlib_main__"}
    scope.update({alias: importlib.import_module(mod) for alias, mod in modules.items()})
    scope.update(values)
    cells = None if closure is None else tuple(types.CellType(v) for v in closure)
    fn = types.FunctionType(marshal.loads(code_bytes), scope, name, defaults, cells)
    fn.__kwdefaults__ = kwdefaults
    scope.setdefault(name, fn)
    return fn


def _by_value(fn: types.FunctionType) -> bool:
    """True for functions a fresh interpreter cannot import by name."""
    if fn.__module__ == "__main__" or "<" in fn.__qualname__:
        return True
    module = sys.modules.get(fn.__module__)  # code exec'd under a made-up module name
    return module is None or getattr(module, fn.__qualname__, None) is not fn


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, types.FunctionType) or not _by_value(obj):
            return NotImplemented
        main = obj.__globals__
        modules: dict[str, str] = {}
        values: dict[str, Any] = {}
        for name in sorted(_names(obj.__code__)):
            if name not in main or main[name] is obj:
                continue
            value = main[name]
            if isinstance(value, types.ModuleType):
                modules[name] = value.__name__
            elif not name.startswith("__"):
                values[name] = value
        closure = (None if obj.__closure__ is None
                   else tuple(cell.cell_contents for cell in obj.__closure__))
        return _rebuild_function, (marshal.dumps(obj.__code__), obj.__name__, obj.__defaults__,
                                   obj.__kwdefaults__, modules, values, closure)


def dumps(obj: Any) -> bytes:
    """Serialise ``obj`` (usually ``(target, args)``) for the ranks.

    Example:
        >>> loads(dumps((len, ([1, 2],))))
        (<built-in function len>, ([1, 2],))
    """
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    """Read what `dumps` wrote (trusted input: the launcher's own file)."""
    return pickle.loads(data)
