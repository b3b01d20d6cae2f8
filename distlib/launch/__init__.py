"""Launching: `launch()`, the ``distlib`` command line, config files and the self-test.

``distlib.launch`` names both this package and the `launch()` function, so the package is
callable: ``distlib.launch(fn, num_processes=2)`` calls `distlib.launch.launcher.launch`.
(A package attribute named like a subpackage would be replaced by the subpackage as soon as
anything imports it; a callable package keeps both meanings in every import order.)
"""

from __future__ import annotations

import sys
import types
from typing import Any

__all__ = ["launch"]


class _CallablePackage(types.ModuleType):
    def __call__(self, target: Any, *args: Any, **options: Any) -> Any:
        from distlib.launch.launcher import launch as launch_function

        return launch_function(target, *args, **options)

    @property
    def __signature__(self) -> Any:
        import inspect

        from distlib.launch.launcher import launch as launch_function

        return inspect.signature(launch_function)


sys.modules[__name__].__class__ = _CallablePackage
launch = sys.modules[__name__]
