"""The strategy seam: all that checkpoints and exports ask of a wrapped model, in one place.

`save_state`, `load_state` and the safetensors export never look at how a model was wrapped;
they call the functions below. Each is named after the member of the ``Wrapped`` protocol it
stands for, and today reads the `Handle` that ``wrap`` attaches
(`distlib.strategies._handle`); once every strategy's wrapped object implements the protocol,
each body becomes one call on it. Nothing else in `distlib.checkpoint` is strategy-specific.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from distlib import _xla
from distlib._safe_unpickle import DEEPSPEED_GLOBALS, check_torch_globals
from distlib.env import Env
from distlib.strategies._handle import EngineOptimizer, handle_of
from distlib.strategies.base import unwrap

# The strategy seam


def _saves_itself(obj: Any) -> bool:
    """Whether ``obj`` checkpoints itself (a DeepSpeed engine) instead of through DCP."""
    handle = handle_of(obj)
    return handle is not None and handle.engine is not None


def _is_saved_with_model(optimizer: Any) -> bool:
    """Whether ``optimizer``'s state is saved by its model's own checkpointing (DeepSpeed)."""
    return isinstance(optimizer, EngineOptimizer)


def _scaler_of(obj: Any) -> torch.amp.GradScaler | None:
    """The GradScaler of an fp16 model, saved beside it; None for any other object."""
    handle = handle_of(obj)
    return None if handle is None else handle.scaler


def _save_itself(obj: Any, folder: pathlib.Path) -> None:
    """Write a self-saving model (and its optimizer) into ``folder``.

    Effects: the engine writes its files under ``folder`` (every rank its part).
    """
    handle_of(obj).engine.save_checkpoint(str(folder), tag="state")  # type: ignore[union-attr]


def _check_own_files(folder: pathlib.Path) -> None:
    """Scan the files a self-saving model will load: DeepSpeed loads them with weights_only=False.

    Raises:
        CheckpointError: a file names a global outside DeepSpeed's own (the file is named).
    """
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix in (".pt", ".pth", ".bin"):
            check_torch_globals(file, DEEPSPEED_GLOBALS, call="load_state()", loader="DeepSpeed")


def _load_itself(obj: Any, folder: pathlib.Path) -> bool:
    """Load a self-saving model from ``folder``; False when the engine found nothing there.

    Effects: loads the engine's weights and optimizer state in place.
    """
    loaded, _ = handle_of(obj).engine.load_checkpoint(  # type: ignore[union-attr]
        str(folder), tag="state")
    return loaded is not None


def _inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind a distlib wrapper (fp16 scaling), whose state DCP saves."""
    return getattr(optimizer, "optimizer", optimizer)


def _full_state(model: Any, env: Env) -> dict[str, Any]:
    """The whole model's tensors on the CPU of rank 0 (other ranks: empty)."""
    handle = handle_of(model)
    module = unwrap(model)
    if handle is not None and handle.engine is not None:
        import deepspeed  # optional backend: only a DeepSpeed-wrapped model gets here

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None,
                                               enabled=handle.engine.zero_optimization_stage() == 3):
            state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        return state if env.is_main else {}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    return state if env.is_main else {}


def _on_cpu(state: dict[str, Any], env: Env) -> dict[str, Any]:
    """Under XLA: CPU copies of the device tensors, which DCP writes and reads as plain ones.

    Loading then copies them into the XLA parameters (``load_state_dict``), and torch's
    ``Optimizer.load_state_dict`` moves the optimizer state to its parameters' device.
    """
    if env.backend != "xla":
        return state
    return _xla.to_cpu(state)  # type: ignore[no-any-return]


def _tied_names(model: Any) -> list[list[str]]:
    """Groups of parameter names that share one tensor (written once, tied again on load).

    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 4))
        >>> net[1].weight = net[0].weight
        >>> _tied_names(net)
        [['0.weight', '1.weight']]
    """
    groups: dict[int, list[str]] = {}
    for name, param in unwrap(model).named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]
