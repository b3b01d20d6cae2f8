"""distlib: one PyTorch script on a CPU, GPUs, many machines or a TPU, as pure functions.

``import distlib`` runs nothing and imports no torch: each public name is loaded from its
module on first use (PEP 562), so the launcher's ``--help`` and the import stay fast.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Env": "distlib.env", "Backend": "distlib.env", "Launcher": "distlib.env",
    "Mesh": "distlib.topology",
    "detect": "distlib.env",
    "Precision": "distlib.precision",
    "Single": "distlib.strategies.single",
    "DDP": "distlib.strategies.ddp",
    "FSDP": "distlib.strategies.fsdp",
    "DeepSpeed": "distlib.strategies.deepspeed",
    "XLA": "distlib.strategies.xla",
    "wrap": "distlib.training.wrapping", "unwrap": "distlib.training.wrapping",
    "context_parallel": "distlib.training.cp",
    "AccelerateScheduler": "distlib.training.scheduler",
    "autocast": "distlib.training.step",
    "MicroStep": "distlib.training.accumulation", "accumulate": "distlib.training.accumulation",
    "backward": "distlib.training.step",
    **dict.fromkeys(("plan_parallelism", "ParallelPlan", "TensorPlan"), "distlib.training.plan"),
    "clip_grad_norm": "distlib.training.step", "seed": "distlib.training.step",
    "any_rank": "distlib.training.agree", "find_executable_batch_size": "distlib.training.agree",
    **dict.fromkeys(("Tracker", "Trackers", "init_trackers"), "distlib.observe.trackers"),
    "StepMeter": "distlib.observe.meter", "profile": "distlib.observe.profiling",
    "launch": "distlib.launcher.launcher", "LaunchResult": "distlib.launcher.launcher",
    "shard": "distlib.data", "split_between_processes": "distlib.data",
    "ShardPlan": "distlib.data", "skip_first_batches": "distlib.data",
    "init_empty_weights": "distlib.big_model.empty", "init_on_device": "distlib.big_model.empty",
    "infer_device_map": "distlib.big_model.device_map", "DeviceMap": "distlib.big_model.device_map",
    "load_checkpoint": "distlib.big_model.loading",
    "dispatch": "distlib.big_model.placement",
    "load_checkpoint_and_dispatch": "distlib.big_model.placement",
    **dict.fromkeys(("gather", "gather_object", "pad_across_processes", "reduce",
                     "broadcast", "broadcast_object", "barrier", "main_process_first"),
                    "distlib.collectives"),
    "gather_metrics": "distlib.metrics",
    "save_state": "distlib.checkpoint.state", "load_state": "distlib.checkpoint.state",
    "save_model": "distlib.checkpoint.export",
    # porting conveniences
    "main_print": "distlib.log", "free_memory": "distlib.training.memory",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # `X as X`: explicit re-exports for type checkers (mypy --strict)
    from distlib.big_model.device_map import DeviceMap as DeviceMap
    from distlib.big_model.device_map import infer_device_map as infer_device_map
    from distlib.big_model.empty import init_empty_weights as init_empty_weights
    from distlib.big_model.empty import init_on_device as init_on_device
    from distlib.big_model.loading import load_checkpoint as load_checkpoint
    from distlib.big_model.placement import dispatch as dispatch
    from distlib.big_model.placement import (
        load_checkpoint_and_dispatch as load_checkpoint_and_dispatch,
    )
    from distlib.checkpoint.export import save_model as save_model
    from distlib.checkpoint.state import load_state as load_state
    from distlib.checkpoint.state import save_state as save_state
    from distlib.collectives import barrier as barrier
    from distlib.collectives import broadcast as broadcast
    from distlib.collectives import broadcast_object as broadcast_object
    from distlib.collectives import gather as gather
    from distlib.collectives import gather_object as gather_object
    from distlib.collectives import main_process_first as main_process_first
    from distlib.collectives import pad_across_processes as pad_across_processes
    from distlib.collectives import reduce as reduce
    from distlib.data import ShardPlan as ShardPlan
    from distlib.data import shard as shard
    from distlib.data import skip_first_batches as skip_first_batches
    from distlib.data import split_between_processes as split_between_processes
    from distlib.env import Backend as Backend
    from distlib.env import Env as Env
    from distlib.env import Launcher as Launcher
    from distlib.env import detect as detect
    from distlib.launcher.launcher import LaunchResult as LaunchResult
    from distlib.launcher.launcher import launch as launch
    from distlib.log import main_print as main_print
    from distlib.metrics import gather_metrics as gather_metrics
    from distlib.observe.meter import StepMeter as StepMeter
    from distlib.observe.profiling import profile as profile
    from distlib.observe.trackers import Tracker as Tracker
    from distlib.observe.trackers import Trackers as Trackers
    from distlib.observe.trackers import init_trackers as init_trackers
    from distlib.precision import Precision as Precision
    from distlib.strategies.ddp import DDP as DDP
    from distlib.strategies.deepspeed import DeepSpeed as DeepSpeed
    from distlib.strategies.fsdp import FSDP as FSDP
    from distlib.strategies.single import Single as Single
    from distlib.strategies.xla import XLA as XLA
    from distlib.topology import Mesh as Mesh
    from distlib.training.accumulation import MicroStep as MicroStep
    from distlib.training.accumulation import accumulate as accumulate
    from distlib.training.agree import any_rank as any_rank
    from distlib.training.agree import (
        find_executable_batch_size as find_executable_batch_size,
    )
    from distlib.training.cp import context_parallel as context_parallel
    from distlib.training.memory import free_memory as free_memory
    from distlib.training.plan import ParallelPlan as ParallelPlan
    from distlib.training.plan import TensorPlan as TensorPlan
    from distlib.training.plan import plan_parallelism as plan_parallelism
    from distlib.training.scheduler import AccelerateScheduler as AccelerateScheduler
    from distlib.training.step import autocast as autocast
    from distlib.training.step import backward as backward
    from distlib.training.step import clip_grad_norm as clip_grad_norm
    from distlib.training.step import seed as seed
    from distlib.training.wrapping import unwrap as unwrap
    from distlib.training.wrapping import wrap as wrap


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module 'distlib' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    # The public path is the one users see in reprs, help() and tracebacks' "distlib.Env".
    # Pickle resolves it here too (this __getattr__); the defining module stays in _EXPORTS.
    with contextlib.suppress(AttributeError, TypeError):
        value.__module__ = "distlib"
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
