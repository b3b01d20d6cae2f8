"""`dl.launch(train, Config(...))` from a notebook, `python -c` and a script, where `train`, its
`nn.Module` and its dataclass all live in `__main__`: they travel by value, two gloo ranks train,
and what they return equals a one-process run of the same function in the caller.

The notebook runs as a user runs one, `jupyter execute` (nbclient) in a real ipykernel kernel,
started with this interpreter from a kernel spec in a temporary folder (nothing is installed for
the user, and a fresh CI environment needs no `ipykernel install`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import distlib as dl
from distlib.errors import LaunchError

pytestmark = pytest.mark.multiprocess

TIMEOUT = 240

# The user's program, one notebook cell per entry; a script and `python -c` run them joined.
CELLS = [
    """\
import dataclasses, json, os
import torch
from torch import nn
import distlib as dl""",
    """\
class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))""",
    """\
@dataclasses.dataclass
class Config:
    width: int = 8
    steps: int = 4
    batch_size: int = 8  # across all ranks
    lr: float = 0.1""",
    """\
def train(cfg: Config) -> dict:
    env = dl.detect()
    torch.manual_seed(0)
    model = Net(cfg.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    x = torch.linspace(-1, 1, 3 * 32).reshape(32, 3)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True) ** 2)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size // env.world_size)
    initial = torch.cat([p.detach().flatten() for p in model.parameters()])
    model, optimizer = dl.wrap(model, env, optimizer=optimizer)
    for _, (xb, yb) in zip(range(cfg.steps), dl.shard(loader, env)):
        loss = nn.functional.mse_loss(model(xb), yb)
        dl.backward(loss, model)
        optimizer.step()
        optimizer.zero_grad()
    weights = torch.cat([p.detach().flatten() for p in dl.unwrap(model).parameters()])
    return {"rank": env.rank, "world_size": env.world_size, "config": cfg,
            "weights": weights.tolist(), "moved": float((weights - initial).abs().max())}""",
    """\
before = dict(os.environ)
cfg = Config(width=6)
ranks = list(dl.launch(train, cfg, num_processes=2, cpu=True, timeout_s=180))
changed = sorted(k for k in {*before, *os.environ} if before.get(k) != os.environ.get(k))
single = train(cfg)  # the same function, one process, here
print(json.dumps({
    "ranks": [[r["rank"], r["world_size"], r["weights"]] for r in ranks],
    "single": [single["world_size"], single["weights"], single["moved"]],
    "configs": [type(r["config"]) is Config and r["config"] == cfg for r in ranks],
    "environ_changed": changed,
}))""",
]
PROGRAM = "\n\n".join(CELLS) + "\n"


def _check(report: dict) -> None:
    """Two ranks ran the function shipped by value and agree with the one-process run."""
    assert [(rank, size) for rank, size, _ in report["ranks"]] == [(0, 2), (1, 2)]
    size, single, moved = report["single"]
    assert size == 1 and moved > 1e-3  # the one-process run trained
    for _, _, weights in report["ranks"]:
        assert weights == pytest.approx(single, rel=1e-5, abs=1e-6)
    assert report["configs"] == [True, True]  # the caller's own dataclass came back
    assert report["environ_changed"] == []  # launch() left the caller's environment alone


def _report(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, stdout
    return json.loads(lines[-1])


def test_launch_from_a_notebook_kernel(tmp_path: Path) -> None:
    # `jupyter execute` as a user runs a notebook: a real ipykernel runs the cells in order.
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    execute = shutil.which("jupyter-execute", path=str(Path(sys.executable).parent))
    assert execute, "nbclient is installed but its jupyter-execute is not beside python"
    kernel = tmp_path / "jupyter" / "kernels" / "distlib-test"
    kernel.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "distlib test", "language": "python"}
    (kernel / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    notebook = tmp_path / "train.ipynb"
    nbformat.write(nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(source) for source in CELLS]), notebook)
    # Kernel spec, connection files and IPython's profile all in tmp_path, not the user's home.
    environ = {**os.environ, "JUPYTER_PATH": str(tmp_path / "jupyter"),
               "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
               "IPYTHONDIR": str(tmp_path / "ipython")}
    done = subprocess.run([execute, "--inplace", "--kernel_name=distlib-test",
                           f"--timeout={TIMEOUT}", "--startup_timeout=120", str(notebook)],
                          cwd=tmp_path, env=environ, capture_output=True, text=True,
                          timeout=TIMEOUT + 120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = nbformat.read(notebook, as_version=4).cells[-1].outputs
    stdout = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    _check(_report(stdout))


def test_launch_from_python_dash_c(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", PROGRAM], cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _check(_report(done.stdout))


def test_launch_from_a_script_run_as_python_script_py(tmp_path: Path) -> None:
    script = tmp_path / "train_here.py"
    script.write_text(PROGRAM, encoding="utf-8")  # no `if __name__ == "__main__":` guard
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _check(_report(done.stdout))


def returns_a_generator(n: int) -> object:
    return {"rows": (row for row in range(n))}


def test_a_rank_returning_what_cannot_be_pickled_is_the_root_cause() -> None:
    with pytest.raises(LaunchError) as info:
        dl.launch(returns_a_generator, 3, num_processes=2, cpu=True, timeout_s=120)
    message = str(info.value)
    assert "root cause" in message, message
    assert ("launch(): `value['rows']` (the value the target returned) must be picklable"
            in message), message
    assert "Return plain values" in message
