"""Trackers, the step meter, profiles and any_rank in a real 2-rank gloo job."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from distlib.testing import spawn

pytestmark = pytest.mark.multiprocess


def _observe(env: Any, folder: str) -> dict[str, Any]:
    import torch

    import distlib as dl

    out: dict[str, Any] = {}
    rows: list[Any] = []

    class Mine:
        def log(self, metrics: Any, step: int | None = None) -> None:
            rows.append((step, dict(metrics)))

        def log_config(self, config: Any) -> None:
            rows.append(("config", dict(config)))

        def close(self) -> None:
            rows.append("closed")

    with dl.init_trackers(env, ["jsonl", "tensorboard", Mine()], project_dir=folder,
                          config={"world": env.world_size}) as run:
        for step in (1, 2):  # every rank logs: "mean" is a collective
            run.log({"loss": torch.tensor(float(env.rank + 1) * step), "lr": 0.1}, step=step)
    main_only = dl.init_trackers(env, [Mine()], reduce="main")
    if env.is_main:  # "main": an exchange-free log, so rank 0 alone may call it
        main_only.log({"acc": torch.tensor(7.0 + env.rank)}, step=3)
    out["rows"] = rows

    ticks = iter(range(100))
    seconds = float(env.rank + 1)  # rank 1 is the slow one: 2 s per clock read
    meter = dl.StepMeter(env, log_every=2, clock=lambda: seconds * next(ticks),
                         memory=lambda: 100 * (env.rank + 1))
    out["meter"] = [meter.step(samples=4 + 2 * env.rank, tokens=10) for _ in range(4)]
    out["per_rank"] = meter.peak_memory_per_rank

    with dl.profile(env, pathlib.Path(folder) / "profile", wait=0, warmup=1, active=1) as prof:
        for _ in range(3):
            torch.ones(64, 64) @ torch.ones(64, 64)
            prof.step()

    out["any"] = [dl.any_rank(env.rank == 1, env), dl.any_rank(False, env),
                  dl.any_rank(torch.tensor(env.rank == 0), env)]
    return out


def test_trackers_meter_profile_and_any_rank_over_two_ranks(tmp_path: pathlib.Path) -> None:
    result = spawn(_observe, str(tmp_path), world_size=2, timeout_s=240)
    main, other = result[0], result[1]

    # trackers: only rank 0 wrote; a tensor with reduce="mean" is the mean of the ranks'
    assert other["rows"] == []
    assert main["rows"] == [("config", {"world": 2}), (1, {"loss": 1.5, "lr": 0.1}),
                            (2, {"loss": 3.0, "lr": 0.1}), "closed", (3, {"acc": 7.0})]
    lines = (tmp_path / "distlib" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in lines] == [1.5, 3.0]  # one writer, not two
    assert len(list((tmp_path / "distlib").glob("events.out.tfevents.*"))) == 1

    # meter: the same report on both ranks; the slowest rank sets the time
    for rank in (0, 1):
        reports = result[rank]["meter"]
        assert [bool(r) for r in reports] == [False, True, False, True]
        report = reports[1]
        assert report["step_time_s"] == 1.0  # rank 1: 2 s per window of 2 steps
        assert report["samples_per_s"] == (2 * 4 + 2 * 6) / 2.0
        assert report["tokens_per_s"] == 40 / 2.0 and report["tokens_per_s_per_rank"] == 10.0
        assert report["peak_memory_bytes"] == 200 and result[rank]["per_rank"] == (100, 200)
    assert main["meter"] == other["meter"]

    # profile: one folder, one trace per rank, named by rank
    traces = sorted(p.name.split(".")[0] for p in (tmp_path / "profile").glob("*.pt.trace.json"))
    assert traces == ["rank0", "rank1"]

    # any_rank: only rank 1 says True -> all True; nobody -> all False
    assert main["any"] == other["any"] == [True, False, True]


TRAIN = '''
import json, os, sys
import torch
import distlib as dl

env = dl.detect()
torch.manual_seed(0)
model = dl.wrap(torch.nn.Linear(8, 1), env)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
meter = dl.StepMeter(env, log_every=4, num_params=9)
out = sys.argv[1]
with dl.init_trackers(env, ["jsonl"], project_dir=out, config={"lr": 0.1}) as run:
    for step in range(100):
        x = torch.randn(16, 8)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        dl.backward(loss, model)
        optimizer.step(); optimizer.zero_grad()
        report = meter.step(samples=16, tokens=16 * 8)
        run.log({"loss": loss.detach(), **report}, step=step)
        if report:
            dl.main_print(env, f"step {step}: {report['tokens_per_s']:.0f} tokens/s")
        # rank 1 alone wants to stop at step 9: every rank must stop with it
        if dl.any_rank(env.rank == 1 and step == 9, env):
            break
with open(os.path.join(out, f"stopped{env.rank}"), "w") as f:
    f.write(str(step))
'''


def test_a_users_script_under_distlib_launch(tmp_path: pathlib.Path) -> None:
    import os
    import subprocess
    import sys

    (tmp_path / "train.py").write_text(TRAIN)
    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "distlib", "launch", "--cpu",
                           "--num-processes", "2", "train.py", str(tmp_path)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(tmp_path / f"stopped{r}").read_text() for r in (0, 1)] == ["9", "9"]
    rows = [json.loads(x) for x in (tmp_path / "distlib" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10))  # one writer: rank 0
    assert [("tokens_per_s" in r) for r in rows] == [s in (3, 7) for s in range(10)]
    assert done.stdout.count("tokens/s") == 2  # printed once (by rank 0) per report
