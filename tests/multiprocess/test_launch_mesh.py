"""``distlib launch --tp-size 2`` on 4 real CPU ranks: every rank's ``detect()`` holds the mesh
the launcher was given, at that rank's coordinates; a mesh that does not fit starts no rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distlib.topology import Mesh

pytestmark = pytest.mark.multiprocess
TIMEOUT = 180

# Each rank prints its Env's mesh and its place in it (no process group is needed for that).
SCRIPT = textwrap.dedent("""
    import json, os
    import distlib as dl
    env = dl.detect()
    print("MESH " + json.dumps({
        "rank": env.rank, "world": env.world_size, "sizes": env.mesh.sizes,
        "coordinates": env.mesh.coordinates(env.rank), "dp_rank": env.mesh.dp_rank(env.rank),
        "dp_size": env.mesh.dp_size, "variable": os.environ.get("DISTLIB_MESH"),
        "strategy": env.strategy.name}), flush=True)
""")


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DISTLIB_MESH"}
    return subprocess.run([sys.executable, "-m", "distlib", "launch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def _printed(out: str) -> dict[int, dict]:
    rows = [json.loads(line.split("MESH ", 1)[1]) for line in out.splitlines() if "MESH {" in line]
    return {row["rank"]: row for row in rows}


def test_each_rank_detects_the_launchers_mesh_at_its_coordinates(tmp_path: Path) -> None:
    (tmp_path / "script.py").write_text(SCRIPT)
    done = _launch(["--cpu", "--num-processes", "4", "--tp-size", "2", "script.py"], tmp_path)
    assert done.returncode == 0, done.stderr
    ranks = _printed(done.stdout)
    assert sorted(ranks) == [0, 1, 2, 3], done.stdout
    mesh = Mesh(dp_shard=2, tp=2).resolve(4)
    for rank, got in ranks.items():
        assert got["world"] == 4
        assert got["sizes"] == {"dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 2}
        assert got["variable"] == "dp_replicate=1,dp_shard=2,cp=1,tp=2"
        assert got["coordinates"] == mesh.coordinates(rank)
        assert (got["dp_rank"], got["dp_size"]) == (rank // 2, 2)  # ranks 0,1 and 2,3 share
        assert got["strategy"] == "fsdp"  # a tp mesh with no strategy named picks FSDP2
    assert [ranks[r]["coordinates"]["tp"] for r in range(4)] == [0, 1, 0, 1]
    assert [ranks[r]["coordinates"]["dp_shard"] for r in range(4)] == [0, 0, 1, 1]


def test_a_mesh_that_does_not_fit_starts_no_rank(tmp_path: Path) -> None:
    (tmp_path / "script.py").write_text(SCRIPT)
    planned = _launch(["--cpu", "--num-processes", "4", "--tp-size", "3", "script.py"], tmp_path)
    assert planned.returncode == 2 and not _printed(planned.stdout)
    assert "must multiply to the number of processes" in planned.stderr
    assert "for 4 processes" in planned.stderr
    # no count given: the agent counts one CPU rank, and refuses tp=2 before starting it
    counted = _launch(["--cpu", "--tp-size", "2", "script.py"], tmp_path)
    assert counted.returncode != 0 and not _printed(counted.stdout)
    assert "must multiply to the number of processes" in counted.stderr, counted.stderr
    assert "for 1 processes" in counted.stderr
