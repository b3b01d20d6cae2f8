"""Experiment trackers: the `Tracker` protocol and `init_trackers`, which fans out to many.

Only the main rank writes: on the other ranks `init_trackers` builds nothing and their `log`
calls write nothing. Tensor metrics are made plain numbers first: ``reduce="mean"`` (the
default) averages them over the data-parallel ranks with `distlib.reduce` — a collective, so
**every rank must call** `Trackers.log` **the same number of times with the same keys** (the
agreement check names a rank that does not); ``reduce="main"`` takes the main rank's value and
exchanges nothing (the other ranks may then skip the call).

Accelerate's names work: ``"tensorboard"``, ``"wandb"``, ``"mlflow"``, ``"aim"`` and ``"all"``
(every one of those four whose library is installed), as its ``log_with`` takes them, plus
``"jsonl"`` (a JSON-lines file, no extra library). ``project_dir`` is where they write, as
Accelerate's ``project_dir``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import torch

from distlib.collectives import reduce as reduce_tensors
from distlib.env import Env
from distlib.errors import ConfigError
from distlib.observe._builtin import BUILTIN, check_installed, is_installed

__all__ = ["AccelerateTracker", "Tracker", "Trackers", "init_trackers"]

_ACCELERATE_ALL = ("tensorboard", "wandb", "mlflow", "aim")
_REDUCE = ("mean", "main")


@runtime_checkable
class Tracker(Protocol):
    """What `init_trackers` fans out to: a built-in tracker or a user's own class.

    ``metrics`` reach a tracker as plain ``int``/``float`` values (tensors already reduced);
    ``step`` is the caller's step or None.

    Examples:
        >>> class Printer:
        ...     def log(self, metrics, step=None): print(step, dict(metrics))
        ...     def log_config(self, config): print(dict(config))
        ...     def close(self): pass
        >>> isinstance(Printer(), Tracker)
        True
    """

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record one row of metrics at ``step``."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the run's configuration (hyper-parameters)."""

    def close(self) -> None:
        """Flush and release what the tracker holds."""


class Trackers:
    """The trackers of one run, as `init_trackers` returns them; ``log`` fans out to each.

    A returned value, never a global: pass it where logging happens, close it at the end
    (or use it as a context manager). ``trackers`` is empty on every rank but the main one.
    """

    __slots__ = ("env", "reduce", "trackers")

    def __init__(self, env: Env, trackers: Sequence[Tracker], *, reduce: str = "mean") -> None:
        self.env = env
        self.trackers = tuple(trackers) if env.is_main else ()
        self.reduce = reduce

    def __repr__(self) -> str:
        names = [getattr(t, "name", type(t).__name__) for t in self.trackers]
        return f"Trackers({names}, rank={self.env.rank}, reduce={self.reduce!r})"

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Write ``metrics`` (numbers or one-element tensors) at ``step`` to every tracker.

        None values are skipped (a `StepMeter` report's unknowns).

        Raises:
            ConfigError: a value that is not a number or a one-element tensor.

        Effects: with ``reduce="mean"`` and tensor values, one all-reduce over the
        data-parallel ranks (every rank must call); writes on the main rank.
        """
        values = _plain_values(metrics, self.env, self.reduce)
        for tracker in self.trackers:
            tracker.log(values, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record ``config`` in every tracker (main rank only; no exchange)."""
        for tracker in self.trackers:
            tracker.log_config(dict(config))

    def close(self) -> None:
        """Close every tracker (main rank only)."""
        for tracker in self.trackers:
            tracker.close()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AccelerateTracker:
    """A tracker written for Accelerate (``accelerate.tracking.GeneralTracker``: ``log``,
    ``store_init_configuration``, ``finish``) seen through the `Tracker` protocol."""

    __slots__ = ("name", "tracker")

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self.name = str(getattr(tracker, "name", type(tracker).__name__))

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.tracker.log(dict(metrics), step=step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.tracker.store_init_configuration(dict(config))

    def close(self) -> None:
        self.tracker.finish()


def _is_accelerate_tracker(item: object) -> bool:
    return all(callable(getattr(item, m, None)) for m in ("log", "store_init_configuration",
                                                          "finish"))


def _plain_values(metrics: Mapping[str, Any], env: Env, reduce: str) -> dict[str, Any]:
    """Numbers as they are; one-element tensors reduced (``"mean"``) or read (``"main"``)."""
    plain: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in metrics.items():
        if value is None:  # not known (StepMeter's mfu on a CPU): nothing to write
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            tensors[str(key)] = value.detach()
        elif isinstance(value, int | float) and not isinstance(value, torch.Tensor):
            plain[str(key)] = value
        else:
            shown = (f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                     else f"{type(value).__name__} {value!r:.60}")
            msg = (f"Trackers.log(): metrics[{key!r}] must be a number or a one-element tensor, "
                   f"but got {shown}. Log a scalar (loss.mean(), acc.item()) per key.")
            raise ConfigError(msg)
    if not tensors:
        return plain
    if reduce == "main" and not env.is_main:
        return plain  # nothing is written here: no need to read the tensors
    # one tensor, one exchange; on env.device, where the backend (NCCL) needs it
    device = env.device if reduce == "mean" else next(iter(tensors.values())).device
    stacked = torch.stack([t.float().reshape(()).to(device) for t in tensors.values()])
    if reduce == "mean":
        stacked = reduce_tensors(stacked, env, op="mean")
    if not env.is_main:
        return plain  # nothing is written here: skip the device-to-host copy
    return {**plain, **dict(zip(tensors, stacked.tolist(), strict=True))}


def _names(trackers: str | Tracker | Sequence[str | Tracker] | None) -> list[str | Tracker]:
    if trackers is None:
        return []
    if isinstance(trackers, str) or not isinstance(trackers, Sequence):
        trackers = [trackers]
    out: list[str | Tracker] = []
    for item in trackers:
        if isinstance(item, Enum) and isinstance(item.value, str):  # Accelerate's LoggerType
            item = item.value
        if item == "all":
            out += [n for n in _ACCELERATE_ALL if is_installed(n)]
        else:
            out.append(item)
    return out


def _check(item: object) -> None:
    if isinstance(item, str) and item not in BUILTIN:
        choices = ", ".join(map(repr, [*BUILTIN, "all"]))
        msg = (f"init_trackers(): each tracker must be one of {choices} or an object with "
               f"log/log_config/close, but got {item!r}. Check the spelling (Accelerate's "
               "log_with takes the same names).")
        raise ConfigError(msg)
    if isinstance(item, str):
        check_installed(item)  # on every rank, so that every rank stops, not only the main one
    elif not isinstance(item, Tracker) and not _is_accelerate_tracker(item):
        msg = (f"init_trackers(): each tracker must be a name or an object with "
               f"log(metrics, step), log_config(config) and close(), but got "
               f"{type(item).__name__} {item!r:.60}. Implement the distlib.Tracker protocol.")
        raise ConfigError(msg)


def init_trackers(env: Env, trackers: str | Tracker | Sequence[str | Tracker] | None, *,
                  project_dir: str | os.PathLike[str] | None = None,
                  config: Mapping[str, Any] | None = None, project_name: str = "distlib",
                  init_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                  reduce: str = "mean") -> Trackers:
    """Build the run's trackers on the main rank and return them as one `Trackers`.

    Args:
        env: this process's Env; only ``env.is_main`` builds and writes.
        trackers: names (``"tensorboard"``, ``"mlflow"``, ``"wandb"``, ``"aim"``, ``"jsonl"``,
            ``"all"``), `Tracker` objects, or a list of both; Accelerate's ``log_with`` value
            works as is (its ``LoggerType`` names and its ``GeneralTracker`` subclasses too).
        project_dir: the folder they write under (default ``./runs``): TensorBoard and JSONL
            in ``<project_dir>/<project_name>``, MLflow's SQLite store, W&B's ``wandb/``
            and Aim's repository in ``<project_dir>``.
        config: hyper-parameters, recorded once with ``log_config``.
        project_name: the run's project / experiment name in each tool.
        init_kwargs: per-tracker keyword arguments for its writer, e.g.
            ``{"wandb": {"mode": "offline"}, "tensorboard": {"flush_secs": 10}}``.
        reduce: ``"mean"`` (tensor metrics averaged over the data-parallel ranks; every rank
            calls ``log``) or ``"main"`` (the main rank's value; no exchange).

    Returns:
        A `Trackers` whose ``log``, ``log_config`` and ``close`` reach every tracker.

    Raises:
        ConfigError: an unknown name or object, a bad ``reduce``, or a missing library
            (naming the ``pip install 'torch-distlib[<extra>]'`` that adds it).

    Examples:
        >>> import tempfile, json, pathlib
        >>> folder = tempfile.mkdtemp()
        >>> with init_trackers(Env(), ["jsonl"], project_dir=folder, config={"lr": 0.1}) as t:
        ...     t.log({"loss": torch.tensor(0.5)}, step=1)
        >>> line = (pathlib.Path(folder) / "distlib" / "metrics.jsonl").read_text()
        >>> json.loads(line)["loss"], json.loads(line)["step"]
        (0.5, 1)

    Effects: on the main rank, creates the folders and opens each tool's writer (importing
    its library then).
    """
    if reduce not in _REDUCE:
        msg = (f"init_trackers(): reduce must be one of {', '.join(map(repr, _REDUCE))}, but "
               f"got {reduce!r}. 'mean' averages tensor metrics over the ranks, 'main' takes "
               "rank 0's.")
        raise ConfigError(msg)
    items = _names(trackers)
    for item in items:
        _check(item)
    kwargs = dict(init_kwargs or {})
    unknown = sorted(set(kwargs) - set(BUILTIN))
    if unknown:
        msg = (f"init_trackers(): init_kwargs keys must be tracker names "
               f"({', '.join(BUILTIN)}), but got {unknown}. Key each writer's options by its name.")
        raise ConfigError(msg)
    folder = pathlib.Path(project_dir if project_dir is not None else "runs")
    built: list[Tracker] = []
    if env.is_main:
        for item in items:
            if isinstance(item, str):
                builder, _ = BUILTIN[item]
                built.append(builder(folder, project_name, kwargs.get(item, {})))
            elif isinstance(item, Tracker):
                built.append(item)
            else:  # Accelerate's GeneralTracker: Accelerator starts it lazily, as here
                if callable(getattr(item, "start", None)):
                    item.start()
                built.append(AccelerateTracker(item))
    result = Trackers(env, built, reduce=reduce)
    if config is not None:
        result.log_config(config)
    return result
