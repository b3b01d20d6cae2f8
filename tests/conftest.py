"""Fixtures every test gets (fail a test that leaks variables, threads or a process group), and
``transformers`` for the tests that need it."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

# Variables third-party libraries write into os.environ on first use (not distlib's leaks):
# torch 2.13 sets TORCHINDUCTOR_CACHE_DIR when torch._dynamo is imported (building an AdamW
# does that); importing deepspeed sets PYTORCH_NVML_BASED_CUDA_CHECK.
_THIRD_PARTY_WRITES = ("TORCHINDUCTOR_CACHE_DIR", "PYTORCH_NVML_BASED_CUDA_CHECK")

# Threads some libraries start once per process and keep on purpose (not leaks of a test).
_KNOWN_THREADS = ("pydevd", "Thread-", "tqdm", "ThreadPoolExecutor", "asyncio", "pymp")


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


def _group_initialized() -> bool:
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail the test if it changed os.environ, left a thread or a process group behind."""
    environ = dict(os.environ)
    threads = _threads()
    yield
    problems: list[str] = []
    changed = {k for k in set(environ) | set(os.environ) if environ.get(k) != os.environ.get(k)}
    changed.discard("PYTEST_CURRENT_TEST")
    changed.difference_update(v for v in _THIRD_PARTY_WRITES if v not in environ)
    if changed:
        problems.append(f"changed environment variables: {sorted(changed)}")
        os.environ.clear()
        os.environ.update(environ)
    deadline = time.monotonic() + 2.0
    while True:
        new = [t for t in _threads() - threads
               if not t.daemon or not t.name.startswith(_KNOWN_THREADS)]
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if new:
        problems.append(f"left threads running: {[t.name for t in new]}")
    if _group_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
        problems.append("left a torch.distributed process group initialised")
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture(scope="session")
def transformers() -> Any:
    """The transformers module, or skip the test that asks for it (it is an optional test dep).

    Only the tests that build transformers' models ask for it (directly, through a fixture of
    theirs, or with ``@pytest.mark.usefixtures("transformers")``), so the rest of their file
    runs without it. Its model code is imported here, once, before any test's leak check: the
    first import of a model sets ``TORCHINDUCTOR_CACHE_DIR``.
    """
    module = pytest.importorskip("transformers")
    from transformers import GPT2LMHeadModel, LlamaForCausalLM  # noqa: F401  (see above)

    return module
