"""Threads per rank as users launch: forked and spawned ranks both get the launcher's count.

The regression this guards: ranks forked from an agent that had already imported torch never
read ``OMP_NUM_THREADS``, so every rank ran one thread per core (5-17x slower on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.multiprocess
TIMEOUT = 180

PROBE = textwrap.dedent("""
    import json, os, sys
    import torch
    rank = os.environ["RANK"]
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as handle:
        json.dump({"threads": torch.get_num_threads(),
                   "interop": torch.get_num_interop_threads(),
                   "omp": os.environ.get("OMP_NUM_THREADS")}, handle)
""")


def _cores() -> int:
    allowed = len(os.sched_getaffinity(0))
    return min(psutil.cpu_count(logical=False) or allowed, allowed)


def _launch(tmp_path: Path, *flags: str, omp: str | None = None) -> list[dict[str, object]]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["XDG_CACHE_HOME"] = str(tmp_path)  # no user config file
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    subprocess.run([sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
                    *flags, str(script), str(out)], env=env, check=True, timeout=TIMEOUT)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_ranks_share_the_cores_by_default_whatever_the_start_method(tmp_path: Path) -> None:
    expected = max(1, _cores() // 2)
    for flags in ((), ("--start-method", "fork"), ("--start-method", "spawn")):
        ranks = _launch(tmp_path, *flags)
        assert [r["threads"] for r in ranks] == [expected, expected], flags
        assert [r["omp"] for r in ranks] == [str(expected)] * 2, flags
    forked = _launch(tmp_path, "--start-method", "fork")
    assert [r["interop"] for r in forked] == [expected, expected]


def test_an_inherited_omp_num_threads_reaches_forked_ranks(tmp_path: Path) -> None:
    ranks = _launch(tmp_path, "--start-method", "fork", omp="3")
    assert [(r["threads"], r["omp"]) for r in ranks] == [(3, "3"), (3, "3")]


def test_launch_api_num_threads(tmp_path: Path) -> None:
    from distlib.testing import spawn

    result = spawn(_threads, world_size=2, join_group=False, num_threads=2)
    assert list(result) == [2, 2]


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())
