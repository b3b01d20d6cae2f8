"""Root conftest: doctests find the examples of public names whose ``__module__`` is "distlib".

``distlib.__getattr__`` sets ``__module__ = "distlib"`` on each public name it hands out (the path
users see). doctest decides whether a class belongs to the module it is collecting by
``__module__``, so once a test has touched ``dl.Env`` the examples in ``distlib/env.py`` would be
skipped (functions: the same, through ``inspect.getmodule``). A public name belongs to the module ``distlib._EXPORTS`` names for it, and only there.
"""

from __future__ import annotations

import doctest
import inspect
from typing import Any

import distlib

_from_module = doctest.DocTestFinder._from_module


def _public_aware_from_module(self: doctest.DocTestFinder, module: Any, object: Any) -> bool:
    name = getattr(object, "__qualname__", None)
    if (module is not None and (inspect.isclass(object) or inspect.isfunction(object))
            and getattr(object, "__module__", None) == "distlib" and name in distlib._EXPORTS):
        return distlib._EXPORTS[name] == module.__name__
    return bool(_from_module(self, module, object))


doctest.DocTestFinder._from_module = _public_aware_from_module  # type: ignore[method-assign]
