"""The built-in trackers: TensorBoard, MLflow, Weights & Biases, Aim and a JSON-lines file.

Each is a thin adapter over its tool's own writer, built on the main rank only, and imports
its library when it is built (never at ``import distlib``): a missing library is one
`ConfigError` naming the extra to install. Values reach them already reduced to plain
numbers (`distlib.observe.trackers.Trackers.log`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from distlib.errors import ConfigError

__all__ = ["BUILTIN", "check_installed", "is_installed", "AimTracker", "JSONLTracker", "MLflowTracker", "TensorBoardTracker",
           "WandbTracker"]


def _missing(name: str, module: str, why: str) -> ConfigError:
    msg = (f"init_trackers(): tracker {name!r} must have its library {module!r} installed, "
           f"but got {why}. Install it with pip install 'torch-distlib[{name}]'.")
    return ConfigError(msg)


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it."""
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def check_installed(name: str) -> None:
    """Raise the `ConfigError` of a built-in tracker whose library is not installed (any rank)."""
    module = BUILTIN[name][1]
    if module is not None and not is_installed(module):
        raise _missing(name, module, f"no module named {module!r}")


def _require(name: str, module: str) -> ModuleType:
    """Import ``module`` for the tracker ``name``, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing(name, module, f"{type(exc).__name__}: {exc}") from exc


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"opt": {"lr": 1}}`` -> ``{"opt/lr": 1}``: the flat keys MLflow and TensorBoard want."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


class JSONLTracker:
    """One JSON object per `log` call in ``<folder>/metrics.jsonl``; the config in ``config.json``.

    Each line is ``{"step": step, "time": unix_seconds, **metrics}``, written and flushed at
    once (a crash keeps what was logged). Needs nothing beyond the standard library.
    """

    name = "jsonl"

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file = (self.folder / "metrics.jsonl").open("a", encoding="utf-8")

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._file.flush()

    def log_config(self, config: Mapping[str, Any]) -> None:
        (self.folder / "config.json").write_text(json.dumps(dict(config), indent=2, default=str))

    def close(self) -> None:
        self._file.close()


class TensorBoardTracker:
    """Scalars through ``torch.utils.tensorboard.SummaryWriter`` in ``<folder>``; the config as
    text (``config``) and as hyper-parameters. Read back with TensorBoard's ``EventAccumulator``."""

    name = "tensorboard"

    def __init__(self, folder: str | os.PathLike[str], **kwargs: Any) -> None:
        _require("tensorboard", "tensorboard")
        writer = importlib.import_module("torch.utils.tensorboard").SummaryWriter
        self.writer = writer(log_dir=str(folder), **kwargs)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.writer.add_text("config", json.dumps(dict(config), default=str))

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """Metrics and parameters through ``mlflow.MlflowClient`` (no active-run global).

    The store: ``tracking_uri`` if given, else ``MLFLOW_TRACKING_URI`` if the user set it, else
    a SQLite file ``<folder>/mlflow.db`` (MLflow 3 keeps its file store in maintenance mode).
    One run per tracker, in the experiment ``experiment_name``; closing marks it finished.
    """

    name = "mlflow"

    def __init__(self, folder: str | os.PathLike[str], *, experiment_name: str = "distlib",
                 tracking_uri: str | None = None, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None) -> None:
        mlflow = _require("mlflow", "mlflow")
        self._entities = importlib.import_module("mlflow.entities")
        if tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
            path = pathlib.Path(folder).resolve()
            path.mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{path / 'mlflow.db'}"
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment_name)
        experiment_id = (found.experiment_id if found is not None
                         else self.client.create_experiment(experiment_name))
        self.run_id: str = self.client.create_run(experiment_id, run_name=run_name,
                                                  tags=dict(tags or {})).info.run_id

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        batch = [self._entities.Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_config(self, config: Mapping[str, Any]) -> None:
        params = [self._entities.Param(k, str(v)[:6000]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """A ``wandb.init`` run in ``<folder>`` (``mode="offline"`` and every other ``wandb.init``
    keyword through ``init_kwargs={"wandb": {...}}``); the config is the run's config."""

    name = "wandb"

    def __init__(self, folder: str | os.PathLike[str], *, project: str = "distlib",
                 **kwargs: Any) -> None:
        wandb = _require("wandb", "wandb")
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, dir=str(folder), **kwargs)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


class AimTracker:
    """An ``aim.Run`` in the repository ``<folder>`` (other ``aim.Run`` keywords through
    ``init_kwargs={"aim": {...}}``); the config under ``run["hparams"]``."""

    name = "aim"

    def __init__(self, folder: str | os.PathLike[str], *, experiment: str = "distlib",
                 **kwargs: Any) -> None:
        aim = _require("aim", "aim")
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
        self.run = aim.Run(repo=str(folder), experiment=experiment, **kwargs)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.run.track(value, name=key, step=step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run["hparams"] = dict(config)

    def close(self) -> None:
        self.run.close()


def _tensorboard(folder: pathlib.Path, project: str, kwargs: Mapping[str, Any]) -> Any:
    return TensorBoardTracker(folder / project, **kwargs)


def _mlflow(folder: pathlib.Path, project: str, kwargs: Mapping[str, Any]) -> Any:
    return MLflowTracker(folder, **{"experiment_name": project, **kwargs})


def _wandb(folder: pathlib.Path, project: str, kwargs: Mapping[str, Any]) -> Any:
    return WandbTracker(folder, **{"project": project, **kwargs})


def _aim(folder: pathlib.Path, project: str, kwargs: Mapping[str, Any]) -> Any:
    return AimTracker(folder, **{"experiment": project, **kwargs})


def _jsonl(folder: pathlib.Path, project: str, kwargs: Mapping[str, Any]) -> Any:
    return JSONLTracker(folder / project, **kwargs)


# name -> (builder(project_dir, project_name, init_kwargs), the module that must be importable)
BUILTIN: dict[str, tuple[Callable[[pathlib.Path, str, Mapping[str, Any]], Any], str | None]] = {
    "tensorboard": (_tensorboard, "tensorboard"),
    "mlflow": (_mlflow, "mlflow"),
    "wandb": (_wandb, "wandb"),
    "aim": (_aim, "aim"),
    "jsonl": (_jsonl, None),
}
