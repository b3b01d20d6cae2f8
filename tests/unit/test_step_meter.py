"""StepMeter: its numbers against hand computation, with an injectable clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.env import Env
from distlib.errors import ConfigError
from distlib.observe import meter as meter_module
from distlib.observe.meter import PEAK_FLOPS, peak_flops_of


def _clock(step_s: float) -> Callable[[], float]:
    """A clock that moves ``step_s`` seconds each time it is read."""
    ticks = iter(range(10_000))
    return lambda: step_s * next(ticks)


def _train_step(model: torch.nn.Module, batch: int) -> None:
    # the input needs its gradient, as every layer but the first does: backward = 2 x forward
    model(torch.randn(batch, 16, requires_grad=True)).sum().backward()


def test_flop_counter_on_the_first_step_matches_the_hand_count() -> None:
    model = torch.nn.Linear(16, 8, bias=False)
    # each timed step reads the clock once (the report); the counted step restarts the window
    meter = dl.StepMeter(Env(), peak_flops=1e4, log_every=2, clock=_clock(0.5),
                         memory=lambda: 1000)
    with meter.count_flops():
        _train_step(model, 4)
    assert meter.step(samples=4) == {}  # the counted step: measured, not timed
    with meter.count_flops():  # later uses count nothing
        _train_step(model, 4)
    assert meter.step(samples=4) == {}
    _train_step(model, 8)
    report = meter.step(samples=8)
    forward = 2 * 16 * 8  # per sample: a multiply and an add per weight
    per_sample = 3 * forward  # backward: grad of input and of weight, each as much as forward
    assert meter._flops_per_sample == per_sample
    seconds = 0.5  # the window: one clock tick between the restart and the report
    assert report["step_time_s"] == seconds / 2
    assert report["samples_per_s"] == 12 / seconds
    assert report["tflops_per_rank"] == pytest.approx(per_sample * 12 / seconds / 1e12)
    assert report["mfu"] == pytest.approx(per_sample * 12 / seconds / 1e4)
    assert report["tokens_per_s"] is None and report["peak_memory_bytes"] == 1000


def test_six_n_tokens_rule_and_the_summary() -> None:
    n = 1_000_000
    meter = dl.StepMeter(Env(), num_params=n, peak_flops=6e9, log_every=3, clock=_clock(1.0),
                         memory=iter([5, 9, 7]).__next__)  # read at each report
    reports = [meter.step(samples=2, tokens=500) for _ in range(6)]
    assert [bool(r) for r in reports] == [False, False, True, False, False, True]
    report = reports[2]
    assert report["step_time_s"] == pytest.approx(1 / 3)  # 3 steps between two reads (1 s)
    assert report["tokens_per_s"] == 3 * 500 / 1.0
    assert report["tokens_per_s_per_rank"] == 3 * 500 / 1.0
    assert report["mfu"] == pytest.approx(6 * n * 1500 / 6e9)
    assert report["peak_memory_bytes"] == 5 and reports[5]["peak_memory_bytes"] == 9
    summary = meter.summary()
    assert summary["peak_memory_bytes"] == 9 and meter.peak_memory_per_rank == (9,)
    assert summary["samples_per_s"] == 12 / 2.0 and summary["tokens_per_s"] == 3000 / 2.0


def test_cpu_mfu_is_none_without_a_peak_and_trackers_skip_it(tmp_path: Any) -> None:
    meter = dl.StepMeter(Env(), flops_per_step=1e9, log_every=1, clock=_clock(1.0))
    assert meter.peak_flops is None
    report = meter.step(samples=1)
    assert report["mfu"] is None and report["tflops_per_rank"] == pytest.approx(1e-3)
    assert report["peak_memory_bytes"] > 10_000_000  # this process's peak RSS
    seen: list[dict[str, Any]] = []

    class Keep:
        def log(self, metrics: Any, step: int | None = None) -> None:
            seen.append(dict(metrics))

        def log_config(self, config: Any) -> None: ...

        def close(self) -> None: ...

    dl.init_trackers(Env(), [Keep()]).log(report, step=1)
    assert "mfu" not in seen[0] and "tokens_per_s" not in seen[0]
    assert seen[0]["samples_per_s"] == 1.0


def test_it_exchanges_only_when_it_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    real = meter_module.gather

    def counting(x: Any, env: Env, **kwargs: Any) -> Any:
        calls.append(x)
        return real(x, env, **kwargs)

    monkeypatch.setattr(meter_module, "gather", counting)
    meter = dl.StepMeter(Env(), log_every=5, clock=_clock(1.0))
    for _ in range(10):
        meter.step(samples=1)
    assert len(calls) == 2


def test_peak_flops_table() -> None:
    assert peak_flops_of("NVIDIA H200") == 989.5e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of("NVIDIA L40S") == 362.05e12  # not L4's
    assert peak_flops_of("NVIDIA L4") == 121e12
    assert peak_flops_of("NVIDIA H100 NVL") == 835e12
    assert peak_flops_of("Intel Xeon") is None
    assert all(v > 1e13 for v in PEAK_FLOPS.values())
    assert dl.StepMeter(Env(), peak_flops=5.0).peak_flops == 5.0


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"log_every": 0}, "log_every must be an int >= 1, but got 0"),
    ({"log_every": True}, "log_every must be an int >= 1, but got True"),
    ({"peak_flops": 0}, "peak_flops must be a number > 0 or None, but got 0"),
    ({"flops_per_step": -1.0}, "flops_per_step must be a number > 0 or None, but got -1.0"),
    ({"num_params": -3}, "num_params must be an int >= 0 or None, but got -3"),
    ({"num_params": 1.5}, "num_params must be an int >= 0 or None, but got 1.5"),
])
def test_bad_meter_arguments(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=r"^StepMeter\(\): ") as info:
        dl.StepMeter(Env(), **kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"samples": -1}, "samples must be an int >= 0, but got -1"),
    ({"samples": "4"}, "samples must be an int >= 0, but got '4'"),
    ({"samples": 4, "tokens": 2.5}, "tokens must be an int >= 0 or None, but got 2.5"),
])
def test_bad_step_arguments(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=r"^StepMeter\.step\(\): ") as info:
        dl.StepMeter(Env()).step(**kwargs)
    assert words in str(info.value)
