"""The sbatch examples resolve to the intended job under a (fake) SLURM allocation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from distlib.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "slurm"


def _launch_args(script: Path, nodes: int) -> list[str]:
    text = script.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("srun distlib launch"))
    line = line.replace("$((SLURM_NNODES * 4))", str(nodes * 4)).replace('"$@"', "")
    return line.split()[3:]


@pytest.mark.parametrize(("name", "nodes"), [("single_node.sbatch", 1),
                                             ("multi_node.sbatch", 2)])
def test_sbatch_examples_resolve_under_slurm(name: str, nodes: int, monkeypatch, capsys,
                                             tmp_path: Path) -> None:
    for key, value in {"SLURM_JOB_ID": "777", "SLURM_NNODES": str(nodes),
                       "SLURM_NODEID": str(nodes - 1),
                       "SLURM_JOB_NODELIST": f"node[01-{nodes:02d}]",
                       "XDG_CACHE_HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DISTLIB_CONFIG_FILE", raising=False)
    monkeypatch.chdir(EXAMPLES.parents[1])
    args = _launch_args(EXAMPLES / name, nodes)
    assert main(["launch", "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if re.match(r"^\w+ ", ln)}
    assert rows["num_machines"] == str(nodes) and rows["machine_rank"] == str(nodes - 1)
    assert rows["main_address"] == "node01" and rows["main_port"] == str(15000 + 777)
    assert "SLURM_NNODES" in out
