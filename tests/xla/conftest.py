"""XLA tests: skipped without torch_xla; otherwise run on the PJRT CPU client.

``import torch_xla`` writes XLA_FLAGS and PJRT_DYNAMIC_PLUGINS into os.environ, so it is
imported here, at collection, before the leak-checking fixture takes its snapshot of the
environment; PJRT_DEVICE defaults to CPU for the same reason (the runtime would otherwise
write it on first use). Neither is library code.
"""

from __future__ import annotations

import importlib.util
import os

HAVE_XLA = importlib.util.find_spec("torch_xla") is not None
SKIP_REASON = ("torch_xla is not installed: the XLA tests run in the nox session 'xla' "
               "(torch==2.9.0 + torch_xla==2.9.0, PJRT_DEVICE=CPU)")

if HAVE_XLA:
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    # torch_xla's profiler scopes set and unset SKIP_MEGASCALE_PJRT_CLIENT=true around each
    # traced step of its parallel loader, from two threads at once: the unset can be lost,
    # which the leak check would blame on the test. Set, it stays as it is.
    os.environ.setdefault("SKIP_MEGASCALE_PJRT_CLIENT", "true")
    import torch_xla
    import torch_xla.core.xla_model
    import torch_xla.runtime

    # Start the runtime before any test runs a CPU backward: torch's autograd engine sizes its
    # device queues at its first backward, and XLA needs its queue (see distlib.training.xla.check_autograd).
    torch_xla.device()


def pytest_collection_modifyitems(config: object, items: list[object]) -> None:
    """Skip every test of this folder, with the reason, where torch_xla is missing."""
    if HAVE_XLA:
        return
    import pathlib

    import pytest

    here = pathlib.Path(__file__).parent
    for item in items:
        if here in pathlib.Path(str(item.path)).parents:  # type: ignore[attr-defined]
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))  # type: ignore[attr-defined]
