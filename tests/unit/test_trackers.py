"""init_trackers and the built-in trackers, read back through each tool's own reader."""

from __future__ import annotations

import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.env import Env
from distlib.errors import ConfigError
from distlib.observe import trackers as trackers_module

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOSSES = [4.0, 2.0, 4.0 / 3]  # what _write_a_run logs at steps 1, 2, 3


class Recorder:
    """A user's own tracker: nothing but the protocol's three methods."""

    def __init__(self) -> None:
        self.rows: list[tuple[int | None, dict[str, Any]]] = []
        self.config: dict[str, Any] = {}
        self.closed = False

    def log(self, metrics: Any, step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_config(self, config: Any) -> None:
        self.config = dict(config)

    def close(self) -> None:
        self.closed = True


def _write_a_run(names: Any, folder: pathlib.Path, **kwargs: Any) -> None:
    with dl.init_trackers(Env(), names, project_dir=folder, config={"lr": 0.5, "opt": {"b": 2}},
                          **kwargs) as run:
        for step in (1, 2, 3):
            run.log({"loss": torch.tensor(4.0 / step), "lr": 0.5, "mfu": None}, step=step)


def test_jsonl_and_a_users_own_tracker(tmp_path: pathlib.Path) -> None:
    mine = Recorder()
    _write_a_run(["jsonl", mine], tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "distlib" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and {x["lr"] for x in lines} == {0.5}
    assert [x["loss"] for x in lines] == pytest.approx(LOSSES)
    assert "mfu" not in lines[0]  # None values are skipped
    assert json.loads((tmp_path / "distlib" / "config.json").read_text()) == {
        "lr": 0.5, "opt": {"b": 2}}
    assert mine.rows[1] == (2, {"loss": 2.0, "lr": 0.5})
    assert isinstance(mine.rows[1][1]["loss"], float)  # tensors reach trackers as numbers
    assert mine.config == {"lr": 0.5, "opt": {"b": 2}} and mine.closed
    assert isinstance(mine, dl.Tracker)


def test_tensorboard_read_back_with_its_event_reader(tmp_path: pathlib.Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write_a_run("tensorboard", tmp_path)
    events = EventAccumulator(str(tmp_path / "distlib"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(LOSSES)
    assert "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_read_back_with_a_client(tmp_path: pathlib.Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _write_a_run("mlflow", tmp_path, project_name="exp")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("exp")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(LOSSES)
    assert run.data.params == {"lr": "0.5", "opt/b": "2"}
    assert run.info.status == "FINISHED"


def test_aim_read_back_from_its_repo(tmp_path: pathlib.Path) -> None:
    import aim
    from aim.sdk.index_manager import RepoIndexManager

    quiet = {"system_tracking_interval": None, "log_system_params": False,
             "capture_terminal_logs": False}
    _write_a_run("aim", tmp_path, init_kwargs={"aim": quiet})
    repo = aim.Repo(str(tmp_path))
    (run_hash,) = repo.list_all_runs()
    RepoIndexManager.get_index_manager(repo).index(run_hash)  # what `aim up` does in the back
    run = aim.Repo(str(tmp_path)).get_run(run_hash)
    assert run["hparams"] == {"lr": 0.5, "opt": {"b": 2}}
    (loss,) = [m for m in run.metrics() if m.name == "loss"]
    steps, (values, *_) = loss.data.items_list()
    assert list(steps) == [1, 2, 3] and list(values) == pytest.approx(LOSSES)


def _wandb_records(path: pathlib.Path) -> list[Any]:
    """The records of a .wandb file (a LevelDB-style log of W&B's own Record protobufs)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_as_a_user_runs_it(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import torch, distlib as dl
        env = dl.detect()
        run = dl.init_trackers(env, "wandb", project_dir={str(tmp_path)!r}, config={{"lr": 0.5}},
                               init_kwargs={{"wandb": {{"mode": "offline"}}}})
        for step in (1, 2, 3):
            run.log({{"loss": torch.tensor(4.0 / step)}}, step=step)
        run.close()
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=240,
                   capture_output=True, cwd=tmp_path)
    (path,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(path)
    def items(found: Any) -> dict[str, Any]:
        return {".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in found}

    rows = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert [row["_step"] for row in rows] == [1, 2, 3]
    assert [row["loss"] for row in rows] == pytest.approx(LOSSES)
    configs = [items(r.config.update) for r in records if r.WhichOneof("record_type") == "config"]
    assert {"lr": 0.5} in configs  # log_config: the run's config


def test_only_the_main_rank_writes(tmp_path: pathlib.Path) -> None:
    mine = Recorder()
    run = dl.init_trackers(Env(rank=1, world_size=2), ["jsonl", "tensorboard", mine],
                           project_dir=tmp_path, config={"a": 1}, reduce="main")
    run.log({"loss": torch.tensor(1.0)}, step=1)
    run.close()
    assert run.trackers == () and not list(tmp_path.iterdir())
    assert mine.rows == [] and mine.config == {} and not mine.closed


@pytest.mark.parametrize(("names", "kwargs", "words"), [
    ("tensorbord", {}, ["'tensorbord'", "'tensorboard'", "'all'", "spelling"]),
    ([object()], {}, ["object", "log(metrics, step)", "Tracker protocol"]),
    (["jsonl"], {"reduce": "sum"}, ["reduce must be one of 'mean', 'main'", "'sum'"]),
    (["jsonl"], {"init_kwargs": {"wand": {}}}, ["init_kwargs keys", "['wand']"]),
])
def test_bad_arguments_name_the_input_rule_value_and_fix(
        tmp_path: pathlib.Path, names: Any, kwargs: Any, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        dl.init_trackers(Env(), names, project_dir=tmp_path, **kwargs)
    assert str(info.value).startswith("init_trackers(): ")
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(("value", "shown"), [
    ([1.0, 2.0], "list [1.0, 2.0]"), ("high", "str 'high'"),
    (torch.ones(3), "a tensor of shape (3,)"), ({"x": 1}, "dict"),
])
def test_a_metric_that_is_not_a_scalar(tmp_path: pathlib.Path, value: Any, shown: str) -> None:
    with dl.init_trackers(Env(), "jsonl", project_dir=tmp_path) as run, \
            pytest.raises(ConfigError) as info:
        run.log({"acc": value}, step=1)
    assert "Trackers.log(): metrics['acc'] must be a number or a one-element tensor" in str(
        info.value)
    assert shown in str(info.value)


@pytest.mark.parametrize("name", ["tensorboard", "mlflow", "wandb", "aim"])
def test_a_missing_library_names_the_extra(tmp_path: pathlib.Path, name: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(ConfigError) as info:
        dl.init_trackers(Env(rank=1, world_size=2), [name], project_dir=tmp_path)  # any rank
    assert f"pip install 'torch-distlib[{name}]'" in str(info.value)
    assert f"tracker {name!r} must have its library" in str(info.value)
    assert name not in trackers_module._names("all")  # "all": the installed ones


def test_all_is_accelerates_four_when_installed() -> None:
    assert trackers_module._names("all") == ["tensorboard", "wandb", "mlflow", "aim"]
    assert trackers_module._names(None) == []


def test_jsonl_imports_no_tracker_library(tmp_path: pathlib.Path) -> None:
    code = textwrap.dedent(f"""
        import sys, distlib as dl
        libs = ("tensorboard", "mlflow", "wandb", "aim")
        before = [m for m in sys.modules if m.split(".")[0] in libs]
        run = dl.init_trackers(dl.Env(), ["jsonl"], project_dir={str(tmp_path)!r})
        run.log({{"loss": 1.0}}, step=0); run.close()
        print(before, [m for m in sys.modules if m.split(".")[0] in libs])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.split() == ["[]", "[]"]


def test_accelerates_names_and_its_own_tracker_classes(tmp_path: pathlib.Path) -> None:
    from accelerate.tracking import GeneralTracker
    from accelerate.utils import LoggerType

    class Theirs(GeneralTracker):  # written for Accelerate, unchanged
        name = "theirs"
        requires_logging_directory = False

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[Any] = []

        @property
        def tracker(self) -> Any:
            return self.seen

        def start(self) -> None:
            self.seen.append("start")

        def store_init_configuration(self, values: dict[str, Any]) -> None:
            self.seen.append(("config", values))

        def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
            self.seen.append((step, values))

        def finish(self) -> None:
            self.seen.append("finish")

    theirs = Theirs()
    _write_a_run([LoggerType.TENSORBOARD, theirs], tmp_path)
    assert list((tmp_path / "distlib").glob("events.out.tfevents.*"))
    assert theirs.seen[:3] == ["start", ("config", {"lr": 0.5, "opt": {"b": 2}}),
                               (1, {"loss": 4.0, "lr": 0.5})]
    assert theirs.seen[-1] == "finish"
    with pytest.raises(ConfigError, match="'comet_ml'"):
        dl.init_trackers(Env(), [LoggerType.COMETML], project_dir=tmp_path)
