"""The environment a test hands a child ``python -m distlib`` process.

Imported as ``tests.child_env`` by the tests that run the ``distlib`` command in a child
process, so that each child sees the same thing: this checkout first on the path, and no
config file anywhere (no ``DISTLIB_*`` variable, a cache folder of the test's own).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ROOT", "child_environ"]

ROOT = Path(__file__).resolve().parents[1]


def child_environ(tmp_path: Path) -> dict[str, str]:
    """A child's environment: this process's, less ``DISTLIB_*``, with this checkout first on
    ``PYTHONPATH`` and ``XDG_CACHE_HOME`` in ``tmp_path`` (no user config file)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DISTLIB_")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                          environ.get("PYTHONPATH")]))
    environ["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return environ
