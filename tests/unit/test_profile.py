"""profile(): one Chrome-trace file per rank, named by rank; the out-of-memory snapshot path."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.env import Env
from distlib.errors import ConfigError
from distlib.observe import profiling


def _steps(prof: Any, n: int) -> None:
    model = torch.nn.Linear(32, 32)
    for _ in range(n):
        model(torch.randn(4, 32)).sum().backward()
        prof.step()


def test_a_trace_per_active_cycle_named_by_rank_and_valid_chrome_json(
        tmp_path: pathlib.Path) -> None:
    with dl.profile(Env(rank=3, world_size=4), tmp_path, wait=1, warmup=1, active=2,
                    repeat=2) as prof:
        _steps(prof, 10)
    traces = sorted(tmp_path.glob("*.pt.trace.json"))
    assert len(traces) == 2  # repeat=2 cycles of wait 1 + warmup 1 + active 2
    assert all(t.name.startswith("rank3.") for t in traces)
    trace = json.loads(traces[0].read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("addmm" in n for n in names)  # the Linear's forward is in it
    assert any(n.startswith("ProfilerStep#") for n in names)


def test_the_oom_snapshot_is_off_on_cpu_and_the_error_passes_through(
        tmp_path: pathlib.Path) -> None:
    assert not profiling.records_memory_history(Env())
    assert not profiling.records_memory_history(Env(device="cuda:0"), cuda_available=False)
    with pytest.raises(torch.OutOfMemoryError), dl.profile(Env(), tmp_path) as prof:
        _steps(prof, 1)
        raise torch.OutOfMemoryError("pretend")
    assert not list(tmp_path.glob("*oom_snapshot*"))


def test_where_cuda_records_history_an_oom_dumps_a_snapshot(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(profiling, "records_memory_history", lambda env: True)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **kw: calls.append(("history", enabled)))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot",
                        lambda path: calls.append(("dump", path)))
    with pytest.raises(torch.OutOfMemoryError), dl.profile(Env(rank=1, world_size=2),
                                                           tmp_path):
        raise torch.OutOfMemoryError("pretend")
    assert calls == [("history", "all"), ("dump", str(tmp_path / "rank1.oom_snapshot.pickle")),
                     ("history", None)]
    calls.clear()
    with dl.profile(Env(), tmp_path, memory_snapshot_on_oom=False):
        pass
    assert calls == []


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"active": 0}, "active must be an int >= 1, but got 0"),
    ({"wait": -1}, "wait must be an int >= 0, but got -1"),
    ({"warmup": 1.5}, "warmup must be an int >= 0, but got 1.5"),
    ({"repeat": "2"}, "repeat must be an int >= 0, but got '2'"),
])
def test_bad_schedules(tmp_path: pathlib.Path, kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=r"^profile\(\): ") as info, \
            dl.profile(Env(), tmp_path, **kwargs):
        pass
    assert words in str(info.value) and "schedule" in str(info.value)
