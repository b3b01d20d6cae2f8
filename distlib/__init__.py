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
    "Env": "distlib.env",
    "detect": "distlib.env",
    "Precision": "distlib.precision",
    "Single": "distlib.strategies.single",
    "DDP": "distlib.strategies.ddp",
    "FSDP": "distlib.strategies.fsdp",
    "DeepSpeed": "distlib.strategies.deepspeed",
    "XLA": "distlib.strategies.xla",
    "wrap": "distlib.training.wrapping", "unwrap": "distlib.training.wrapping",
    "AccelerateScheduler": "distlib.training.scheduler",
    "autocast": "distlib.precision",
    "MicroStep": "distlib.training.accumulation", "accumulate": "distlib.training.accumulation",
    "backward": "distlib.training.step",
    "clip_grad_norm": "distlib.training.step", "seed": "distlib.training.step",
    "launch": "distlib.launch", "LaunchResult": "distlib.launch.launcher",
    "shard": "distlib.data", "split_between_processes": "distlib.data",
    "ShardPlan": "distlib.data", "skip_first_batches": "distlib.data",
    **dict.fromkeys(("init_empty_weights", "init_on_device", "infer_device_map", "DeviceMap",
                     "load_checkpoint", "dispatch", "load_checkpoint_and_dispatch"),
                    "distlib.big_model"),
    **dict.fromkeys(("gather", "gather_object", "pad_across_processes", "reduce",
                     "broadcast", "broadcast_object", "barrier", "main_process_first"),
                    "distlib.collectives"),
    "gather_metrics": "distlib.metrics",
    "save_state": "distlib.checkpoint.state", "load_state": "distlib.checkpoint.state",
    "save_model": "distlib.checkpoint.export",
    # porting conveniences
    "main_print": "distlib.log", "free_memory": "distlib.memory",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from distlib.big_model import (
        DeviceMap,
        dispatch,
        infer_device_map,
        init_empty_weights,
        init_on_device,
        load_checkpoint,
        load_checkpoint_and_dispatch,
    )
    from distlib.checkpoint.export import save_model
    from distlib.checkpoint.state import load_state, save_state
    from distlib.collectives import (
        barrier,
        broadcast,
        broadcast_object,
        gather,
        gather_object,
        main_process_first,
        pad_across_processes,
        reduce,
    )
    from distlib.data import ShardPlan, shard, skip_first_batches, split_between_processes
    from distlib.env import Env, detect
    from distlib.launch.launcher import LaunchResult, launch  # the package is callable
    from distlib.log import main_print
    from distlib.memory import free_memory
    from distlib.metrics import gather_metrics
    from distlib.precision import Precision, autocast
    from distlib.strategies.ddp import DDP
    from distlib.strategies.deepspeed import DeepSpeed
    from distlib.strategies.fsdp import FSDP
    from distlib.strategies.single import Single
    from distlib.strategies.xla import XLA
    from distlib.training.accumulation import MicroStep, accumulate
    from distlib.training.scheduler import AccelerateScheduler
    from distlib.training.step import backward, clip_grad_norm, seed
    from distlib.training.wrapping import unwrap, wrap


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
