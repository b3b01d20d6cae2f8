"""Several devices of the PJRT CPU client (``CPU_NUM_DEVICES=2``), each case in a child process.

The device count and SPMD mode are fixed when the runtime starts, so each case runs this file
as a script in a child with its own environment and prints one JSON line; the test compares
it with a plain-CPU computation done here. What the cases establish (docs/tpu.md):

- SPMD over a two-device mesh trains exactly like one CPU process on the same global batches;
- replicas started by ``xmp.spawn`` see their ranks through the runtime, and the XLA strategy
  refuses them at once instead of hanging in an all-reduce that cannot complete there;
- a backward that ran before the XLA runtime started is reported by ``wrap``, not left to
  crash autograd later.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import distlib as dl
from distlib import _xla
from distlib.strategies.xla import XLA


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen))
            for _ in range(3)]


def train_cpu() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, y in batches():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict()


def spmd_case() -> dict[str, object]:
    """Child: the DESIGN loop under XLA(spmd=True), batches split over a 2-device mesh."""
    import torch_xla

    env = dl.Env(device="xla", backend="xla", strategy=XLA(spmd=True))
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = dl.wrap(model, XLA(spmd=True), env=env, optimizer=opt)
    mesh = _xla.data_mesh()
    losses, specs = [], []
    for x, y in batches():
        xb, yb = _xla.shard_batch((x, y), mesh)
        specs.append(torch_xla._XLAC._get_xla_sharding_spec(xb))
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        dl.backward(loss, model)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    loader = _xla.device_loader(torch.utils.data.DataLoader(torch.arange(8.0).view(4, 2),
                                                            batch_size=2), mesh=mesh)
    loaded = [(torch_xla._XLAC._get_xla_sharding_spec(b), b.cpu().tolist()) for b in loader]
    state = {k: v.tolist() for k, v in _xla.to_cpu(dict(model.state_dict())).items()}
    return {"devices": _xla.num_devices(), "ranks": _xla.runtime_ranks(), "specs": specs,
            "loaded": loaded, "losses": losses, "state": state}


def _replica(index: int) -> None:
    from distlib.errors import StrategyError

    ranks = _xla.runtime_ranks()
    env = dl.Env(device="xla", backend="xla", **ranks)
    try:
        dl.wrap(mlp(), XLA(), env=env)
        outcome = "wrapped"
    except StrategyError as exc:
        outcome = str(exc)
    line = json.dumps({"index": index, "ranks": ranks, "device": str(_xla.device()),
                       "outcome": outcome})
    sys.stdout.write(line + "\n")  # one write per line: the replicas are threads of one process
    sys.stdout.flush()


def xmp_case() -> None:
    """Child: two xmp.spawn replicas (threads on the CPU client) try to wrap a model."""
    import torch_xla.distributed.xla_multiprocessing as xmp

    xmp.spawn(_replica)


def late_case() -> dict[str, object]:
    """Child: a CPU backward runs before the XLA runtime starts; wrap must say so, not crash."""
    from distlib.errors import StrategyError

    torch.ones(1, requires_grad=True).sum().backward()
    try:
        dl.wrap(mlp(), XLA(), env=dl.Env(device="xla", backend="xla"))
    except StrategyError as exc:
        return {"outcome": str(exc)}
    return {"outcome": "wrapped"}


def run_child(case: str) -> list[str]:
    environ = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="2")
    if case == "spmd":
        environ["XLA_USE_SPMD"] = "1"
    done = subprocess.run([sys.executable, __file__, case], env=environ, capture_output=True,
                          text=True, timeout=150, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if line.startswith("{")]


def test_spmd_on_two_cpu_devices_equals_one_cpu_process() -> None:
    (line,) = run_child("spmd")
    got = json.loads(line)
    assert got["devices"] == 2
    assert got["ranks"]["world_size"] == 1  # one process drives both devices
    assert got["specs"] == ["{devices=[2,1]0,1}"] * 3  # the batch really is split
    assert [spec for spec, _ in got["loaded"]] == ["{devices=[2,1]0,1}"] * 2
    assert [rows for _, rows in got["loaded"]] == [[[0.0, 1.0], [2.0, 3.0]],
                                                  [[4.0, 5.0], [6.0, 7.0]]]
    losses, state = train_cpu()
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses),
                               rtol=1e-5, atol=1e-6)
    for name, value in state.items():
        torch.testing.assert_close(torch.tensor(got["state"][name]), value,
                                   rtol=1e-5, atol=1e-6)


def test_xmp_replicas_know_their_ranks_and_are_refused_fast() -> None:
    lines = sorted((json.loads(line) for line in run_child("xmp")), key=lambda r: r["index"])
    assert [r["ranks"] for r in lines] == [
        {"rank": i, "world_size": 2, "local_rank": i, "local_world_size": 2,
         "node_rank": 0, "num_nodes": 1} for i in range(2)]
    assert [r["device"] for r in lines] == ["xla:0", "xla:1"]
    assert all("must run as one replica" in r["outcome"] for r in lines), lines


def test_a_backward_before_the_runtime_starts_is_a_clear_error() -> None:
    (line,) = run_child("late")
    assert "must start before the first backward" in json.loads(line)["outcome"]


if __name__ == "__main__":
    if sys.argv[1] == "xmp":
        xmp_case()
    else:
        print(json.dumps({"spmd": spmd_case, "late": late_case}[sys.argv[1]]()), flush=True)
