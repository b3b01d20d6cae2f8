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
