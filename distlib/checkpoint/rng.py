"""Each rank's random states in a checkpoint: capture, restore, validate, save and load.

A checkpoint holds one file per rank, ``rng/rank<r>.pt``, with the python, numpy (when
installed), torch and CUDA (when initialised) generator states. The file is read with
``weights_only=True`` and its layout is checked before anything is restored. At the saving
job's world size each rank gets its own saved states back; at another, every rank seeds its
generators from `derived_seed`: rank 0's saved torch state and the new rank, so a resume
repeats itself and no two ranks draw the same numbers.
"""

from __future__ import annotations

import hashlib
import pathlib
import random
from collections.abc import Mapping
from typing import Any

import torch

from distlib._safe_unpickle import load_torch_file
from distlib.env import Env
from distlib.errors import CheckpointError

__all__ = ["capture_rng_state", "check_rng_state", "derived_seed", "load_rng_state",
           "restore_rng_state", "rng_file", "save_rng_state", "seed_rng_state"]


def rng_file(folder: pathlib.Path, rank: int) -> pathlib.Path:
    """Where rank ``rank``'s states live in a checkpoint ``folder``.

    Examples:
        >>> rng_file(pathlib.Path("ckpt"), 3).as_posix()
        'ckpt/rng/rank3.pt'
    """
    return folder / "rng" / f"rank{rank}.pt"


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and (initialised) CUDA generator states.

    Examples:
        >>> {"python", "torch"} <= set(capture_rng_state())
        True
    """
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
        state["numpy"] = (kind, torch.from_numpy(np.array(keys)), pos, has_gauss, gauss)
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the generators from what `capture_rng_state` returned (checked by `check_rng_state`).

    Effects: sets the python, numpy, torch and CUDA global generator states.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss_np = state["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss_np))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_rng_state(state: Any) -> None:
    """Raise TypeError/ValueError unless ``state`` has the layout `capture_rng_state` returns.

    Examples:
        >>> check_rng_state(capture_rng_state())
        >>> check_rng_state({"torch": torch.get_rng_state()})
        Traceback (most recent call last):
        ...
        ValueError: it lacks the 'python' and 'torch' states
    """
    if not isinstance(state, Mapping) or not {"python", "torch"} <= set(state):
        raise ValueError("it lacks the 'python' and 'torch' states")
    python = state["python"]
    if not (isinstance(python, tuple) and len(python) == 3 and isinstance(python[0], int)
            and isinstance(python[1], (tuple, list)) and len(python[1]) == 625
            and all(isinstance(v, int) for v in python[1])):
        raise ValueError("its 'python' state is not a random.getstate() value")
    tensors = [state["torch"], *(state.get("cuda") or [])]
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in tensors):
        raise ValueError("its torch/cuda states are not uint8 tensors")
    numpy = state.get("numpy")
    if numpy is not None and not (isinstance(numpy, tuple) and len(numpy) == 5
                                  and isinstance(numpy[0], str)
                                  and isinstance(numpy[1], torch.Tensor)):
        raise ValueError("its 'numpy' state is not a numpy RNG state")


def save_rng_state(folder: pathlib.Path, rank: int) -> None:
    """Write this process's states as rank ``rank``'s file of a checkpoint being staged.

    Effects: writes ``rng/rank<rank>.pt`` in ``folder`` (whose ``rng/`` folder exists).
    """
    with open(rng_file(folder, rank), "wb") as handle:
        torch.save(capture_rng_state(), handle)


def derived_seed(saved_torch_state: torch.Tensor, rank: int) -> int:
    """The seed of rank ``rank`` resumed at another world size: a hash of the saved job's
    rank-0 torch generator state and the new rank (the same on every resume, one per rank).

    Examples:
        >>> state = torch.Generator().manual_seed(0).get_state()
        >>> derived_seed(state, 1) == derived_seed(state, 1) != derived_seed(state, 2)
        True
    """
    digest = hashlib.sha256(b"distlib-rng-reshard")
    digest.update(saved_torch_state.numpy().tobytes())
    digest.update(rank.to_bytes(8, "little"))
    return int.from_bytes(digest.digest()[:8], "little")


def seed_rng_state(seed: int) -> None:
    """Seed the python, numpy, torch and every CUDA generator from ``seed``.

    Effects: sets the python, numpy, torch and CUDA global generator states.
    """
    random.seed(seed)
    torch.manual_seed(seed)  # CUDA's generators too, when there are devices
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)


def _read_rng_file(path: pathlib.Path, rank: int) -> dict[str, Any]:
    file = rng_file(path, rank)
    state = load_torch_file(file, file=str(file), call="load_state()",
                            what="a complete RNG state file", fix="Pass rng=False to skip it.")
    try:
        check_rng_state(state)
    except (TypeError, ValueError) as exc:
        msg = (f"load_state(): {file} must hold the RNG states save_state writes, but {exc}. "
               "The checkpoint is damaged; pass rng=False to skip it.")
        raise CheckpointError(msg) from None
    return dict(state)


def load_rng_state(path: pathlib.Path, env: Env, manifest: Mapping[str, Any]) -> None:
    """Restore this rank's states from the checkpoint folder ``path`` (read as ``load_state``).

    At the saving job's world size rank ``r`` gets the states it saved. At another world
    size there is no saved state for the new ranks to take: every rank seeds its python,
    numpy, torch and CUDA generators with `derived_seed` of the saving job's rank-0 torch
    state and its own rank, so the resumed job draws the same numbers on every resume and
    different ones on each rank (not those of the saving job: the numerics after such a
    resume match a run at the new size only up to these fresh random draws).

    Raises:
        CheckpointError: the file is truncated, unsafe or not an RNG state file.

    Effects: sets the global generator states.
    """
    if manifest["world_size"] != env.world_size:
        saved = _read_rng_file(path, 0)
        seed_rng_state(derived_seed(saved["torch"], env.rank))
        return
    restore_rng_state(_read_rng_file(path, env.rank))
