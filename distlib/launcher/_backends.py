"""Which optional backend a launch plan needs, and whether this Python has it (torch-free).

A strategy or precision that needs an optional package (DeepSpeed, torch_xla, torchao) is
refused before any rank starts when the package cannot be found, with one line that names
the install command, instead of every rank failing its import. The look-up is
``importlib.util.find_spec`` on the top-level name: nothing is imported. The ranks run the
launcher's own interpreter, so what it can find, they can import.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass

from distlib.launcher.plan import LaunchPlan

__all__ = ["BACKENDS", "Backend", "missing_backend"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Backend:
    """An optional package a setting needs.

    Attributes:
        setting: the launch setting that needs it (``strategy``, ``precision``).
        value: the value of that setting that needs it (``deepspeed``).
        module: the top-level module to find (``deepspeed``).
        install: the command that installs it.
    """

    setting: str
    value: str
    module: str
    install: str


BACKENDS: tuple[Backend, ...] = (
    Backend(setting="strategy", value="deepspeed", module="deepspeed",
            install="pip install 'torch-distlib[deepspeed]'"),
    Backend(setting="strategy", value="xla", module="torch_xla",
            install="pip install 'torch-distlib[xla]'"),
    Backend(setting="precision", value="fp8", module="torchao", install="pip install torchao"),
)


def _found(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module without a spec
        return False


def missing_backend(plan: LaunchPlan, *, found: Callable[[str], bool] = _found) -> str | None:
    """The one-line refusal for the first package ``plan`` needs that cannot be found, else None.

    Args:
        plan: the resolved launch plan.
        found: whether a top-level module can be found (a seam for tests; default:
            ``importlib.util.find_spec``, which imports nothing).

    Example:
        >>> plan = LaunchPlan(nproc_per_node=2, cpu=True, strategy="deepspeed")
        >>> print(missing_backend(plan, found=lambda name: False))
        launch settings: `strategy` 'deepspeed' must have the module `deepspeed` installed, but got no `deepspeed` in this Python (...). Install it: pip install 'torch-distlib[deepspeed]'
        >>> missing_backend(plan, found=lambda name: True) is None
        True

    Effects: looks up module specs on ``sys.path`` (no import).
    """
    for backend in BACKENDS:
        if getattr(plan, backend.setting) != backend.value or found(backend.module):
            continue
        return (f"launch settings: `{backend.setting}` {backend.value!r} must have the module "
                f"`{backend.module}` installed, but got no `{backend.module}` in this Python "
                f"({sys.executable}). Install it: {backend.install}")
    return None
