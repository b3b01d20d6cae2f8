"""Checkpoint housekeeping and async saves in one process.

keep_last / keep_best (never a foreign folder), latest_checkpoint (partial saves ignored, a
cut-short swap recovered), model-only saves (``rng=False``), ``load_state(exclude=...)`` (a
new head on a saved body), the `SaveHandle` of ``async_save=True`` (staged copies, waiting,
errors at ``wait``, a forgotten handle at exit), and every new argument's refusals.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import distlib as dl
from distlib.checkpoint import SaveHandle, is_checkpoint, latest_checkpoint
from distlib.checkpoint._async import _ATTRIBUTE, check_async
from distlib.checkpoint._folder import MANIFEST, old_of
from distlib.checkpoint._keep import plan_removals, series_prefix
from distlib.errors import CheckpointError

ENV = dl.Env()


def _model(seed: int = 0, out: int = 2) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, out))


def _names(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# keep_last / keep_best


@given(st.dictionaries(st.sampled_from([f"s_{i}" for i in range(12)]),
                       st.tuples(st.integers(0, 50), st.none() | st.floats(-5, 5)),
                       min_size=1),
       st.integers(1, 6), st.sampled_from([None, "min", "max"]))
def test_plan_keeps_the_newest_and_the_best(entries: dict[str, Any], keep_last: int,
                                            best: str | None) -> None:
    kept_name = max(entries, key=lambda n: (entries[n][0], n))
    removed = set(plan_removals(kept_name, entries, keep_last, best))
    kept = set(entries) - removed
    newest = sorted(entries, key=lambda n: (entries[n][0], n), reverse=True)[:keep_last]
    assert kept_name in kept and set(newest) <= kept
    scored = [n for n in entries if entries[n][1] is not None]
    extra = kept - set(newest)
    assert len(extra) <= (1 if best and scored else 0)
    if best and scored:
        values = [entries[n][1] for n in scored]
        target = min(values) if best == "min" else max(values)
        assert any(entries[n][1] == target for n in kept)


def test_series_prefix_is_the_name_without_its_number() -> None:
    assert series_prefix("step_0100") == "step_"
    assert series_prefix("ckpt7") == "ckpt"
    assert series_prefix("42") is None  # a bare number has no prefix to match siblings by
    assert series_prefix("final") is None


def test_keep_last_removes_only_older_checkpoints_of_the_series(tmp_path: pathlib.Path) -> None:
    model = _model()
    foreign = tmp_path / "step_notes"  # same prefix, no trailing number and no manifest
    foreign.mkdir()
    (tmp_path / "step_999").mkdir()  # a numbered folder without a manifest: not ours
    (tmp_path / "step_998").write_text("a file")
    dl.save_state(tmp_path / "other_1", ENV, model=model)  # another series
    for step in range(1, 5):
        dl.save_state(tmp_path / f"step_{step}", ENV, model=model, step=step, keep_last=2)
    assert _names(tmp_path) == ["other_1", "step_3", "step_4", "step_998", "step_999",
                                "step_notes"]
    dl.save_state(tmp_path / "step_5", ENV, model=model, keep_last=1)
    assert _names(tmp_path) == ["other_1", "step_5", "step_998", "step_999", "step_notes"]


def test_keep_best_spares_the_best_value(tmp_path: pathlib.Path) -> None:
    model = _model()
    losses = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.7, 5: 0.6}
    for step, loss in losses.items():
        dl.save_state(tmp_path / f"e{step}", ENV, model=model, loss=loss, keep_last=2,
                      keep_best=("loss", "min"))
    assert _names(tmp_path) == ["e2", "e4", "e5"]
    for step, acc in {6: 0.1, 7: 0.95, 8: 0.3, 9: 0.2}.items():
        dl.save_state(tmp_path / f"e{step}", ENV, model=model, loss=acc, keep_last=1,
                      keep_best=("loss", "max"))
    assert _names(tmp_path) == ["e7", "e9"]


def test_first_format_manifests_count_by_their_mtime(tmp_path: pathlib.Path) -> None:
    model = _model()
    for step in (1, 2):
        dl.save_state(tmp_path / f"s{step}", ENV, model=model, step=step)
    for step in (1, 2):  # as written before saved_at_ns and rng existed
        file = tmp_path / f"s{step}" / MANIFEST
        manifest = json.loads(file.read_text())
        del manifest["saved_at_ns"], manifest["rng"]
        file.write_text(json.dumps(manifest))
        os.utime(file, ns=(step * 10**18, step * 10**18))
    assert latest_checkpoint(tmp_path) == tmp_path / "s2"
    assert dl.load_state(tmp_path / "s1", ENV, model=model) == {"step": 1}  # RNG restored
    dl.save_state(tmp_path / "s3", ENV, model=model, keep_last=2)
    assert _names(tmp_path) == ["s2", "s3"]


# latest_checkpoint


def test_latest_checkpoint_skips_partial_and_recovers_a_cut_swap(tmp_path: pathlib.Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    model = _model()
    for step in (1, 2, 3):
        dl.save_state(tmp_path / f"step_{step}", ENV, model=model, step=step)
    partial = tmp_path / ".step_4.partial"  # a save killed before its manifest
    partial.mkdir()
    (partial / "dcp").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_3"
    os.replace(tmp_path / "step_3", old_of(tmp_path / "step_3"))  # killed between renames
    assert latest_checkpoint(tmp_path) == tmp_path / "step_3"
    assert dl.load_state(latest_checkpoint(tmp_path), ENV, model=model) == {"step": 3}
    (tmp_path / "step_2" / MANIFEST).write_text("{not json")  # damaged: skipped, not fatal
    os.replace(old_of(tmp_path / "step_3"), tmp_path / "step_3")
    (tmp_path / "step_3" / MANIFEST).unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_1"
    assert latest_checkpoint(str(tmp_path)) == tmp_path / "step_1"


# model-only saves and exclude


def test_a_model_only_save_writes_no_rng_and_loads_by_default(tmp_path: pathlib.Path) -> None:
    model = _model()
    path = dl.save_state(tmp_path / "weights", ENV, model=model, rng=False)
    assert not list((path / "rng").iterdir())
    other = _model(seed=5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert dl.load_state(path, ENV, model=other) == {}
    assert torch.equal(torch.get_rng_state(), state)  # nothing to restore: left alone
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters(),
                                                 strict=True))
    assert dl.load_state(path, ENV, model=other, rng=False) == {}
    with pytest.raises(CheckpointError, match=r"rng must be None or False .* rng=True"):
        dl.load_state(path, ENV, model=other, rng=True)


def test_exclude_loads_a_saved_body_under_a_new_head(tmp_path: pathlib.Path) -> None:
    model = _model(out=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    path = dl.save_state(tmp_path / "c", ENV, model=model, optimizer=optimizer)
    new = _model(seed=9, out=5)  # another head: other shapes under the same keys
    new_optimizer = torch.optim.AdamW(new.parameters(), lr=0.1)
    head = new[2].weight.detach().clone()
    with pytest.raises(CheckpointError, match="other shapes"):
        dl.load_state(path, ENV, model=new, optimizer=new_optimizer)
    dl.load_state(path, ENV, model=new, optimizer=new_optimizer, exclude=("2.*",))
    assert torch.equal(new[0].weight, model[0].weight)
    assert torch.equal(new[2].weight, head)
    state = new_optimizer.state_dict()["state"]
    assert torch.equal(state[0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert 2 not in state and 3 not in state  # the head's moments were not loaded
    new(torch.randn(3, 4)).sum().backward()
    new_optimizer.step()  # and the optimizer still steps the new head
    with pytest.raises(ValueError, match=r"exclude pattern must match .* 'lm_head\.\*'"):
        dl.load_state(path, ENV, model=new, exclude=("2.*", "lm_head.*"))


@pytest.mark.parametrize("exclude", ["2.*", [2], 7, None])
def test_exclude_must_be_a_sequence_of_patterns(tmp_path: pathlib.Path, exclude: Any) -> None:
    path = dl.save_state(tmp_path / "c", ENV, model=_model())
    with pytest.raises(TypeError, match=r"exclude must be a tuple of glob patterns"):
        dl.load_state(path, ENV, model=_model(), exclude=exclude)


# async saves


def test_async_save_stages_a_copy_and_commits_at_wait(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    original = FileSystemWriter.write_data

    def late(self: Any, plan: Any, planner: Any) -> Any:  # the write starts after the change
        time.sleep(0.5)
        return original(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", late)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    handle = dl.save_state(tmp_path / "c", ENV, async_save=True, model=model,
                           optimizer=optimizer, step=1)
    assert isinstance(handle, SaveHandle) and handle.path == tmp_path / "c"
    assert getattr(model, _ATTRIBUTE)() is handle  # remembered on the saved objects
    assert not handle.done() and "pending" in repr(handle)
    with torch.no_grad():  # training goes on at once
        for param in model.parameters():
            param.mul_(-3.0)
    assert handle.wait() == tmp_path / "c" and handle.done() and "done" in repr(handle)
    assert not hasattr(model, _ATTRIBUTE)
    other = _model(seed=4)
    assert dl.load_state(handle.path, ENV, model=other) == {"step": 1}
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), before, strict=True))


def test_a_later_save_or_load_of_the_same_objects_waits(tmp_path: pathlib.Path) -> None:
    model = _model()
    first = dl.save_state(tmp_path / "c", ENV, async_save=True, model=model, step=1)
    second = dl.save_state(tmp_path / "c", ENV, async_save=True, model=model, step=2)
    assert first.done()
    assert dl.load_state(tmp_path / "c", ENV, model=model) == {"step": 2}
    assert second.done() and second.wait() == first.wait()


def test_a_failed_async_save_raises_at_wait_and_keeps_the_last(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    model = _model()
    dl.save_state(tmp_path / "c", ENV, model=model, step=1)

    def broken(self: Any, plan: Any, planner: Any) -> Any:
        raise OSError("the writer broke")

    monkeypatch.setattr(FileSystemWriter, "write_data", broken)
    handle = dl.save_state(tmp_path / "c", ENV, async_save=True, model=model, step=2)
    for _ in range(2):  # every wait raises it
        with pytest.raises(CheckpointError, match="the writer broke"):
            handle.wait()
    monkeypatch.undo()
    assert not (tmp_path / ".c.partial").exists()
    assert dl.load_state(tmp_path / "c", ENV, model=model) == {"step": 1}
    monkeypatch.setattr(FileSystemWriter, "write_data", broken)
    unseen = dl.save_state(tmp_path / "c", ENV, async_save=True, model=model, step=3)
    with pytest.raises(CheckpointError, match="the writer broke"):  # nobody saw it: raised here
        dl.save_state(tmp_path / "c", ENV, model=model, step=4)
    monkeypatch.undo()
    assert unseen.done()
    assert dl.save_state(tmp_path / "c", ENV, model=model, step=4) == tmp_path / "c"


def test_a_forgotten_handle_commits_at_exit(tmp_path: pathlib.Path) -> None:
    script = textwrap.dedent("""
        import sys, torch, distlib as dl
        model = torch.nn.Linear(64, 64)
        dl.save_state(sys.argv[1], dl.Env(), async_save=True, model=model, step=7)
    """)
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "c")], check=True, env=env,
                   timeout=120)
    assert is_checkpoint(tmp_path / "c")
    assert dl.load_state(tmp_path / "c", ENV, model=torch.nn.Linear(64, 64)) == {"step": 7}


# refusals of the new arguments


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"async_save": 1}, TypeError, r"async_save must be True or False, but got 1"),
    ({"async_save": "yes"}, TypeError, r"async_save must be True or False"),
    ({"rng": None}, TypeError, r"rng must be True or False, but got None"),
    ({"keep_last": 0}, ValueError, r"keep_last must be an int >= 1 or None, but got 0"),
    ({"keep_last": -2}, ValueError, r"keep_last must be an int >= 1"),
    ({"keep_last": 2.0}, TypeError, r"keep_last must be an int >= 1 or None, but got 2.0"),
    ({"keep_last": True}, TypeError, r"keep_last must be an int"),
    ({"keep_last": "3"}, TypeError, r"keep_last must be an int"),
    ({"keep_best": ("loss", "min")}, ValueError, r"keep_best must come with keep_last"),
    ({"keep_last": 2, "keep_best": "loss"}, TypeError, r"keep_best must be a \(value name"),
    ({"keep_last": 2, "keep_best": ("loss", "low")}, TypeError, r"'min' \| 'max'"),
    ({"keep_last": 2, "keep_best": ["loss", "min"]}, TypeError, r"keep_best must be a"),
    ({"keep_last": 2, "keep_best": ("acc", "max")}, ValueError,
     r"keep_best must name a number saved in the same call, but got 'acc'"),
    ({"keep_last": 2, "keep_best": ("step", "max")}, ValueError, r"but got 'step' = 'x'"),
    ({"async_save": True, "progress": True}, ValueError, r"progress must be False or None"),
])
def test_new_save_arguments_are_refused_with_the_rule(tmp_path: pathlib.Path,
                                                      options: dict[str, Any],
                                                      error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        dl.save_state(tmp_path / "step_1", ENV, model=_model(), loss=0.5, step="x", **options)
    assert not (tmp_path / "step_1").exists() and not list(tmp_path.iterdir())


def test_keep_last_needs_a_numbered_name(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"path must end in a number .* 'final'"):
        dl.save_state(tmp_path / "final", ENV, model=_model(), keep_last=2)


@pytest.mark.parametrize("rng", [1, "no"])
def test_load_rng_must_be_a_bool_or_none(tmp_path: pathlib.Path, rng: Any) -> None:
    path = dl.save_state(tmp_path / "c", ENV, model=_model())
    with pytest.raises(TypeError, match=r"load_state\(\): rng must be True or False"):
        dl.load_state(path, ENV, model=_model(), rng=rng)


def test_async_save_refuses_deepspeed_and_xla() -> None:
    with pytest.raises(ValueError, match=r"async_save .* DeepSpeed engine objects \['engine'\]"):
        check_async(ENV, {"engine": "engine", "step": "value"}, None)
    with pytest.raises(ValueError, match=r"DeepSpeed engine objects \['opt'\]"):
        check_async(ENV, {"opt": "engine-optimizer"}, None)
    with pytest.raises(ValueError, match=r"async_save .* backend 'xla'"):
        check_async(dl.Env(backend="xla"), {"model": "model"}, None)
    check_async(ENV, {"model": "model", "optimizer": "optimizer"}, False)
