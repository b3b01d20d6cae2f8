"""`distlib.launch` and `distlib.testing.spawn` with real gloo ranks on 127.0.0.1."""

from __future__ import annotations

import functools
import os
import time

import pytest

from distlib.errors import LaunchError
from distlib.launcher.launcher import LaunchResult
from distlib.launcher.launcher import launch as launch_function
from distlib.testing import spawn

pytestmark = pytest.mark.multiprocess
TIMEOUT = 180.0


def report(offset: int) -> dict:
    """Everything a rank can tell about itself, after one all_reduce and one all_gather."""
    import torch
    import torch.distributed as dist

    import distlib
    from distlib import runtime

    env = distlib.detect()
    with runtime.process_group(env):
        total = torch.tensor([float(env.rank + offset)])
        dist.all_reduce(total)
        gathered = [torch.zeros(1) for _ in range(env.world_size)]
        dist.all_gather(gathered, torch.tensor([float(env.rank)]))
    return {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
            "launcher": env.launcher, "device": env.device, "backend": env.backend,
            "precision": str(env.precision), "strategy": env.strategy,
            "timeout_s": env.timeout_s, "debug": env.debug, "agent_store": env.agent_store,
            "sum": total.item(), "gathered": [t.item() for t in gathered],
            "launched": os.environ.get("DISTLIB_LAUNCHED")}


def test_callable_returns_per_rank_values_and_children_see_the_plan() -> None:
    before = dict(os.environ)
    result = launch_function(report, 10, num_processes=2, cpu=True, timeout_s=TIMEOUT, precision="bf16",
                    strategy="ddp", strategy_options={"static_graph": True},
                    collective_timeout_s=77, debug=True)
    assert dict(os.environ) == before
    assert isinstance(result, LaunchResult) and len(result) == 2
    from distlib.strategies.ddp import DDP

    for rank in range(2):
        got = result[rank]
        assert got["rank"] == rank and got["world_size"] == 2 and got["local_rank"] == rank
        assert (got["launcher"], got["device"], got["backend"]) == ("distlib", "cpu", "gloo")
        assert got["precision"] == "bf16" and got["strategy"] == DDP(static_graph=True)
        assert got["timeout_s"] == 77.0 and got["debug"] and got["launched"] == "1"
        assert got["sum"] == sum(r + 10 for r in range(2))  # the single-process answer
        assert got["gathered"] == [0.0, 1.0]


def _barrier_then_fail(env, bad_rank: int) -> int:
    import torch.distributed as dist

    if env.rank == bad_rank:
        raise ValueError(f"rank {env.rank} cannot go on")
    dist.barrier()  # the other ranks wait here until the launcher stops them
    return env.rank


def test_a_raising_rank_fails_the_launch_fast_with_its_traceback() -> None:
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        spawn(_barrier_then_fail, 1, world_size=2, timeout_s=TIMEOUT)
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert "rank 1 failed" in text and "ValueError: rank 1 cannot go on" in text
    assert "_barrier_then_fail" in text and "_bootstrap.py" not in text
    assert text.count("Traceback (most recent call last)") == 1
    assert elapsed < 90, elapsed  # seconds, not the 1800 s collective timeout


def test_spawn_ships_local_functions_and_partials_by_value() -> None:
    scale = 3

    def local(env, extra, *, power=1):
        return (env.rank * scale + extra) ** power

    result = spawn(functools.partial(local, power=2), 1, world_size=2, timeout_s=TIMEOUT,
                   start_method="spawn")  # fresh interpreters, not forks of the agent
    assert list(result) == [(r * scale + 1) ** 2 for r in range(2)]


def test_the_launcher_is_torch_free_until_called() -> None:
    import subprocess
    import sys

    code = "import sys, distlib.launcher.launcher, distlib.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "False"
    import distlib

    assert distlib.launch is launch_function and callable(launch_function)
    assert "num_processes" in str(__import__("inspect").signature(distlib.launch))


REPL_SESSION = """
import os, distlib
before = dict(os.environ)
def where(offset):
    return distlib.detect().rank + offset
print(list(distlib.launch(where, 100, num_processes=2, cpu=True, timeout_s=170)))
print(dict(os.environ) == before)
"""


def test_a_function_typed_into_a_repl_runs_in_the_ranks(tmp_path) -> None:
    import subprocess
    import sys

    # `python -` runs stdin as __main__ with no file behind it, like a REPL or a notebook.
    out = subprocess.run([sys.executable, "-"], input=REPL_SESSION, cwd=tmp_path,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.stdout.split() == ["[100,", "101]", "True"], out.stderr
