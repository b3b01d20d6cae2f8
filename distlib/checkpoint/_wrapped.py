"""The strategy seam: all that checkpoints and exports ask of a wrapped model, in one place.

`save_state`, `load_state` and the safetensors export never look at how a model was wrapped;
they call the functions below, each one call on the model's `Wrapped`
(`distlib.training.wrapped`), which every strategy's applier implements. Nothing else in
`distlib.checkpoint` is strategy-specific.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch

from distlib import _xla
from distlib._safe_unpickle import DEEPSPEED_GLOBALS, check_torch_globals
from distlib.env import Env
from distlib.training.single import full_state_of
from distlib.training.wrapped import owner_of, wrapped_of
from distlib.training.wrapping import unwrap

# The strategy seam


def _saves_itself(obj: Any) -> bool:
    """Whether ``obj`` checkpoints itself (a DeepSpeed engine) instead of through DCP."""
    wrapped = wrapped_of(obj)
    return wrapped is not None and wrapped.saves_itself


def _is_saved_with_model(optimizer: Any) -> bool:
    """Whether ``optimizer``'s state is saved by its model's own checkpointing (DeepSpeed)."""
    owner = owner_of(optimizer)
    return owner is not None and owner.saves_itself


def _scaler_of(obj: Any) -> torch.amp.GradScaler | None:
    """The GradScaler of an fp16 model, saved beside it; None for any other object."""
    wrapped = wrapped_of(obj)
    return None if wrapped is None else wrapped.scaler  # type: ignore[no-any-return]


def _save_itself(obj: Any, folder: pathlib.Path) -> None:
    """Write a self-saving model (and its optimizer) into ``folder``.

    Effects: the engine writes its files under ``folder`` (every rank its part).
    """
    wrapped_of(obj).save_checkpoint(folder)  # type: ignore[union-attr]


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
    return wrapped_of(obj).load_checkpoint(folder)  # type: ignore[union-attr]


def _inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind a distlib wrapper (fp16 scaling), whose state DCP saves."""
    return getattr(optimizer, "optimizer", optimizer)


def _full_state(model: Any, env: Env) -> dict[str, Any]:
    """The whole model's tensors on the CPU of rank 0 (other ranks: empty); every rank calls it."""
    wrapped = wrapped_of(model)
    if wrapped is not None:
        return wrapped.full_state()
    return full_state_of(unwrap(model), env)


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
