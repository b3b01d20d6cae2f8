"""save_state / load_state: resumable training state, written atomically.

A checkpoint is a folder::

    path/
      distlib_state.json   manifest: what was saved, by how many ranks; written last
      dcp/                 models and optimizers through torch.distributed.checkpoint (sharded)
      deepspeed/<name>/    DeepSpeed engines, through the engine's own checkpointing
      objects.pt           state_dicts of schedulers, scalers, loaders, ... (rank 0)
      rng/rank<r>.pt       each rank's python / numpy / torch / CUDA RNG states

It is written beside the target (``.<name>.partial``) and renamed into place only when
complete, so a job killed mid-save leaves the last good checkpoint intact. Loading never
unpickles arbitrary objects: the manifest is JSON; ``objects.pt`` and the RNG files are read
with ``weights_only=True``; DCP's ``.metadata`` through a restricted unpickler and its
non-tensor entries with ``weights_only=True`` (`distlib._safe_unpickle.read_dcp`); a
DeepSpeed engine's files are scanned for globals before DeepSpeed loads them.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import random
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from distlib import _checkpoint_folder as folders
from distlib._checkpoint_folder import MANIFEST
from distlib.collectives import barrier, gather_object
from distlib.env import Env
from distlib.errors import CheckpointError

__all__ = ["MANIFEST", "is_checkpoint", "load_state", "save_state"]

FORMAT = 1
_PLAIN = (int, float, str, bool, type(None))


def _is_plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _classify(objects: Mapping[str, Any], call: str) -> dict[str, str]:
    """name -> "engine" | "model" | "optimizer" | "stateful" | "value"."""
    import torch

    from distlib.training.wrapped import owner_of, wrapped_of

    kinds: dict[str, str] = {}
    for name, obj in objects.items():
        wrapped, owner = wrapped_of(obj), owner_of(obj)
        if wrapped is not None and wrapped.saves_itself:
            kinds[name] = "engine"
        elif isinstance(obj, torch.nn.Module):
            kinds[name] = "model"
        elif owner is not None and owner.saves_itself:
            kinds[name] = "engine-optimizer"
        elif isinstance(obj, torch.optim.Optimizer):
            kinds[name] = "optimizer"
        elif hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
            kinds[name] = "stateful"
        elif _is_plain(obj):
            kinds[name] = "value"
        else:
            msg = (f"{call}: {name} must be a model, an optimizer, an object with state_dict/"
                   f"load_state_dict, or a plain JSON value, but got {type(obj).__name__}. "
                   "Pass what it holds (e.g. its state_dict()) instead.")
            raise CheckpointError(msg)
    return kinds


def _inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind a distlib wrapper (fp16 scaling)."""
    return getattr(optimizer, "optimizer", optimizer)


def _owner(optimizer: Any, models: Mapping[str, Any], name: str, call: str) -> Any:
    """The model (unwrapped) whose parameters ``optimizer`` updates."""
    from distlib.training.wrapping import unwrap

    wanted = {id(p) for group in _inner_optimizer(optimizer).param_groups
              for p in group["params"]}
    for model in models.values():
        module = unwrap(model)
        if wanted <= {id(p) for p in module.parameters()}:
            return module
    msg = (f"{call}: optimizer {name!r} must update the parameters of a model passed in the "
           f"same call, but got none among {sorted(models) or 'no models'}. Pass the model "
           "too, e.g. save_state(path, env, model=model, optimizer=optimizer).")
    raise CheckpointError(msg)


def _pairs(objects: Mapping[str, Any], kinds: Mapping[str, str],
           call: str) -> dict[str, tuple[Any, list[tuple[str, Any]]]]:
    """model name -> (unwrapped module, [(optimizer name, torch optimizer), ...])."""
    from distlib.training.wrapping import unwrap

    models = {n: o for n, o in objects.items() if kinds[n] == "model"}
    pairs: dict[str, tuple[Any, list[tuple[str, Any]]]] = {
        n: (unwrap(m), []) for n, m in models.items()}
    for name, obj in objects.items():
        if kinds[name] == "optimizer":
            owner = _owner(obj, models, name, call)
            model_name = next(n for n, (module, _) in pairs.items() if module is owner)
            pairs[model_name][1].append((name, _inner_optimizer(obj)))
    return pairs


def _dcp_state(objects: Mapping[str, Any], kinds: Mapping[str, str], call: str) -> dict[str, Any]:
    """Model and optimizer state dicts in torch.distributed.checkpoint's vocabulary."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        get_state_dict,
    )

    state: dict[str, Any] = {}
    for name, (module, optimizers) in _pairs(objects, kinds, call).items():
        if len(optimizers) == 1:  # the common case: one pass over the parameters
            state[name], state[optimizers[0][0]] = get_state_dict(module, optimizers[0][1])
            continue
        state[name] = get_model_state_dict(module)
        for opt_name, optimizer in optimizers:
            state[opt_name] = get_optimizer_state_dict(module, optimizer)
    return state


def _scalers(objects: Mapping[str, Any], kinds: Mapping[str, str]) -> dict[str, Any]:
    """The GradScaler of each fp16 model, saved as '<model>.scaler'."""
    from distlib.training.wrapped import wrapped_of

    out = {}
    for name, obj in objects.items():
        wrapped = wrapped_of(obj)
        if kinds[name] == "model" and wrapped is not None and wrapped.scaler is not None:
            out[f"{name}.scaler"] = wrapped.scaler
    return out


def _rng_state() -> dict[str, Any]:
    import torch

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


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss_np = state["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss_np))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _shapes(state: Mapping[str, Any]) -> dict[str, list[Any]]:
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")]
            for k, v in state.items() if hasattr(v, "shape")}


def _tied_names(model: Any) -> list[list[str]]:
    from distlib.training.wrapping import unwrap

    groups: dict[int, list[str]] = {}
    for name, param in unwrap(model).named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silence DCP's notice that it runs in one process: that is what distlib asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def _swap_into_place(staging: pathlib.Path, path: pathlib.Path) -> None:
    """Rename the finished staging folder to ``path``; the last complete one goes last."""
    folders.swap_into_place(staging, path)


def _write_manifest(staging: pathlib.Path, manifest: Mapping[str, Any]) -> None:
    tmp = staging / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, staging / MANIFEST)


def save_state(path: str | os.PathLike[str], env: Env, **objects: Any) -> pathlib.Path:
    """Save models, optimizers, schedulers, loaders, RNG states and plain values, atomically.

    Call it on every rank with the same names. Models and optimizers are saved sharded
    through ``torch.distributed.checkpoint`` (any strategy: single, DDP, FSDP2), DeepSpeed
    engines through their own checkpointing; the GradScaler of an fp16 model is saved with it;
    objects with ``state_dict`` (schedulers, a sharded loader's position) and plain JSON values
    (``step=10``) are saved by rank 0; every rank saves its RNG states.

    Args:
        path: the checkpoint folder (on a file system all ranks share).
        env: this process's Env.
        **objects: what to save, by name; ``load_state`` takes the same names.

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointError: an object cannot be saved (its type, or an optimizer whose model is
            not passed); ``path`` is a file, or a folder holding files but no checkpoint
            (a save replaces the folder whole); the disk cannot hold the new copy (checked before writing from the
            tensors' sizes) or filled up while writing (the partial folder is then removed):
            the message names the folder and the bytes needed and free. Every rank raises
            when any rank's part failed.

    Effects: joins the process group; writes ``.<name>.partial`` beside ``path`` and renames
    it to ``path`` when complete (the previous checkpoint is removed only after that; a save
    cut short at any point, any number of times in a row, leaves the last complete checkpoint
    in ``path`` or ``.<name>.old``, where `load_state` finds it). Under XLA the model and
    optimizer tensors are copied to the CPU first (the graph runs).

    Examples:
        >>> import torch, distlib as dl, tempfile, os
        >>> model = torch.nn.Linear(2, 2)
        >>> folder = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> _ = dl.save_state(folder, dl.Env(), model=model, step=3)
        >>> dl.load_state(folder, dl.Env(), model=model)["step"]
        3
    """
    from distlib.runtime import initialize

    initialize(env)
    call = "save_state()"
    path = pathlib.Path(os.path.abspath(path))
    _refuse_foreign(path)
    kinds = _classify(objects, call)
    staging = path.parent / f".{path.name}.partial"
    state, small = _collect(objects, kinds, env, call)
    needed = folders.tensor_bytes(state, small)
    refusal = _prepare_staging(staging, path, needed) if env.is_main else None
    refusals = [r for r in _exchange(env, refusal) if r is not None]
    if refusals:
        raise CheckpointError(refusals[0])

    def write() -> dict[str, Any]:
        import torch

        manifest = _save_parts(staging, env, objects, kinds, state, small)
        with open(staging / "rng" / f"rank{env.rank}.pt", "wb") as handle:
            torch.save(_rng_state(), handle)
        return manifest

    manifest = _all_or_none(env, write, staging, path, needed)

    def finish() -> None:
        if env.is_main:
            _write_manifest(staging, manifest)
            _swap_into_place(staging, path)

    _all_or_none(env, finish, staging, path, needed)
    return path


def _refuse_foreign(path: pathlib.Path) -> None:
    """A save replaces ``path`` whole: refuse a file, or a folder that holds something else."""
    if path.is_dir() and not folders.is_complete(path):
        held = sorted(p.name for p in path.iterdir())
        if held:
            msg = (f"save_state(): path must be a checkpoint folder, an empty folder or a new "
                   f"path, but got {str(path)!r}, which holds other files ({held[:5]}"
                   f"{' ...' if len(held) > 5 else ''}). A save replaces the folder as a whole: "
                   "pick a folder of its own, e.g. os.path.join(output_dir, 'checkpoint').")
            raise CheckpointError(msg)
    elif path.exists() and not path.is_dir():
        msg = (f"save_state(): path must be a folder or a new path, but got {str(path)!r}, "
               "which is a file. Pick another name for the checkpoint folder.")
        raise CheckpointError(msg)


def _prepare_staging(staging: pathlib.Path, path: pathlib.Path, needed: int) -> str | None:
    """Main rank: clear a stale staging folder, check the free space, create the folder."""
    folders.remove_folder(staging)
    refusal = folders.space_refusal(staging, path, needed, "save_state()")
    if refusal is None:
        if not staging.parent.is_dir():
            staging.parent.mkdir(parents=True)
        staging.mkdir()
        (staging / "rng").mkdir()
    return refusal


def _exchange(env: Env, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order; the one sync point of each step of a save.

    Under XLA objects cannot be exchanged: the ranks only wait for each other, and a rank's
    failure is raised by that rank alone (the launcher then ends the job).
    """
    if env.backend == "xla":
        barrier(env)
        return [value]
    return gather_object([value], env)


def _all_or_none(env: Env, work: Callable[[], Any], staging: pathlib.Path, path: pathlib.Path,
                 needed: int) -> Any:
    """Run one step of a save on every rank; if any rank fails, every rank raises and the
    partial folder is removed (a full disk is a `CheckpointError` that says so)."""
    from torch.distributed.checkpoint.api import CheckpointException

    result, own, failure = None, None, None
    try:
        result = work()
    except (Exception, CheckpointException) as exc:  # DCP's error is a BaseException
        own = exc
        failure = folders.describe_failure(exc, env.rank, staging, needed)
    failures = [f for f in _exchange(env, failure) if f is not None]
    if not failures:
        return result
    if env.is_main:
        with contextlib.suppress(OSError):
            folders.remove_folder(staging)
    full = [f for f in failures if f.disk_full]
    if full:
        msg = folders.disk_full_message(full[0], staging, path, needed, "save_state()")
        raise CheckpointError(msg) from own
    if own is not None:
        raise own
    msg = (f"save_state(): every rank must write its part of {staging}, but rank "
           f"{failures[0].rank} failed ({failures[0].text}). See that rank's error; the partial "
           "save was removed.")
    raise CheckpointError(msg)


def _collect(objects: Mapping[str, Any], kinds: Mapping[str, str], env: Env,
             call: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DCP state (models, optimizers) and the small state dicts rank 0 saves."""
    state = _on_cpu(_dcp_state(objects, kinds, call), env)
    small = {n: o.state_dict() for n, o in objects.items() if kinds[n] == "stateful"}
    small |= {n: s.state_dict() for n, s in _scalers(objects, kinds).items()}
    return state, small


def _save_parts(staging: pathlib.Path, env: Env, objects: Mapping[str, Any],
                kinds: Mapping[str, str], state: Mapping[str, Any],
                small: Mapping[str, Any]) -> dict[str, Any]:
    """Write every part but the RNG states and the manifest; return the manifest."""
    import torch
    from torch.distributed.checkpoint import state_dict_saver

    from distlib.training.wrapped import wrapped_of

    if state:
        with _quiet_single_process():
            state_dict_saver.save(dict(state), checkpoint_id=staging / "dcp",
                                  no_dist=not env.is_distributed)
    for name, obj in objects.items():
        if kinds[name] == "engine":
            wrapped_of(obj).save_checkpoint(  # type: ignore[union-attr]
                staging / "deepspeed" / name)
    if env.is_main and small:
        with open(staging / "objects.pt", "wb") as handle:
            torch.save(dict(small), handle)
    return {
        "format": FORMAT,
        "world_size": env.world_size,
        "strategy": env.strategy.name,
        "kinds": dict(kinds),
        "values": {n: o for n, o in objects.items() if kinds[n] == "value"},
        "models": {n: {"tensors": _shapes(state[n]), "tied": _tied_names(objects[n])}
                   for n in objects if kinds[n] == "model"},
        "objects": sorted(small),
    }


def _on_cpu(state: dict[str, Any], env: Env) -> dict[str, Any]:
    """Under XLA: CPU copies of the device tensors, which DCP writes and reads as plain ones.

    Loading then copies them into the XLA parameters (``load_state_dict``), and torch's
    ``Optimizer.load_state_dict`` moves the optimizer state to its parameters' device.
    """
    if env.backend != "xla":
        return state
    from distlib import _xla

    return _xla.to_cpu(state)  # type: ignore[no-any-return]


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `load_state` finds a complete checkpoint at ``path``: resume or start afresh.

    True also when a save was killed between its two renames: the last complete checkpoint
    then waits in ``.<name>.old``, where `load_state` reads it (testing for the manifest in
    ``path`` alone would start the job afresh and lose it).

    Args:
        path: the checkpoint folder passed to `save_state`.

    Returns:
        True when ``path`` or ``.<name>.old`` beside it holds a finished checkpoint.

    Examples:
        >>> import torch, distlib as dl, tempfile, os
        >>> folder = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> is_checkpoint(folder)
        False
        >>> _ = dl.save_state(folder, dl.Env(), model=torch.nn.Linear(2, 2), step=1)
        >>> is_checkpoint(folder)
        True
    """
    path = pathlib.Path(os.path.abspath(path))
    return folders.is_complete(path) or folders.is_complete(folders.old_of(path))


def _resolve(path: str | os.PathLike[str]) -> pathlib.Path:
    """The checkpoint folder to read: ``path``, or the previous one if a swap was cut short."""
    path = pathlib.Path(os.path.abspath(path))
    old = folders.old_of(path)
    if not folders.is_complete(path) and folders.is_complete(old):
        return old
    if not folders.is_complete(path):
        why = ("it holds no " + MANIFEST + " (an unfinished save?)") if path.exists() \
            else "it does not exist"
        msg = (f"load_state(): path must be a checkpoint folder written by save_state, but got "
               f"{str(path)!r}: {why}. Check the path, or load an earlier checkpoint.")
        raise CheckpointError(msg)
    return path


def _read_manifest(path: pathlib.Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        msg = (f"load_state(): {path / MANIFEST} must be readable JSON, but got {exc}. "
               "The checkpoint is damaged; load an earlier one.")
        raise CheckpointError(msg) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        msg = (f"load_state(): the checkpoint format must be {FORMAT}, but got "
               f"{found!r} in {path}. Was it written by another distlib version?")
        raise CheckpointError(msg)
    problem = _manifest_problem(manifest)
    if problem:
        msg = (f"load_state(): {path / MANIFEST} must hold what save_state writes, but "
               f"{problem}. The checkpoint is damaged; load an earlier one.")
        raise CheckpointError(msg)
    return manifest


def _manifest_problem(manifest: Mapping[str, Any]) -> str:
    """What is wrong with a parsed manifest's layout ("" when nothing)."""
    import torch

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    kinds, models = manifest.get("kinds"), manifest.get("models")
    if not is_int(manifest.get("world_size")) or manifest["world_size"] < 1:
        return f"world_size is {manifest.get('world_size')!r}"
    if not isinstance(kinds, dict) or not all(isinstance(v, str) for v in kinds.values()):
        return f"kinds is {kinds!r:.80}"
    if not isinstance(manifest.get("values"), dict) or not isinstance(models, dict):
        return "values or models is not an object"
    objects = manifest.get("objects")
    if not isinstance(objects, list) or not all(isinstance(n, str) for n in objects):
        return f"objects is {objects!r:.80}"
    for name, model in models.items():
        tensors = model.get("tensors") if isinstance(model, dict) else None
        if not isinstance(tensors, dict) or not isinstance(model.get("tied"), list):
            return f"model {name!r} has no tensors/tied lists"
        for key, entry in tensors.items():
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
                    and all(is_int(d) and d >= 0 for d in entry[0])
                    and isinstance(entry[1], str)
                    and isinstance(getattr(torch, entry[1], None), torch.dtype)):
                return f"tensor {key!r} of model {name!r} is described as {entry!r:.80}"
    return ""


def _check_names(manifest: Mapping[str, Any], objects: Mapping[str, Any],
                 kinds: Mapping[str, str], path: pathlib.Path) -> None:
    saved = manifest["kinds"]
    missing = sorted(n for n in objects if n not in saved)
    if missing:
        msg = (f"load_state(): every name must have been saved, but got {missing}, which "
               f"{path} does not hold (it holds {sorted(saved)}). Use the names passed to "
               "save_state.")
        raise CheckpointError(msg)
    for name, kind in kinds.items():
        if saved[name] != kind:
            msg = (f"load_state(): {name!r} must be a {saved[name]} as when saved, but got a "
                   f"{kind}. Pass the same kind of object under each name.")
            raise CheckpointError(msg)


def _check_model(name: str, expected: Mapping[str, Any], state: Mapping[str, Any],
                 path: pathlib.Path) -> None:
    """Name the keys that are missing, unexpected or of another shape."""
    got = _shapes(state)
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(f"{k}: checkpoint {expected[k][0]} vs model {got[k][0]}"
                    for k in set(got) & set(expected) if list(expected[k][0]) != got[k][0])
    if missing or unexpected or shapes:
        parts = [f"missing in the model: {missing[:10]}" if missing else "",
                 f"not in the checkpoint: {unexpected[:10]}" if unexpected else "",
                 f"other shapes: {shapes[:10]}" if shapes else ""]
        msg = (f"load_state(): model {name!r} must match the checkpoint in {path}, but got "
               f"{'; '.join(p for p in parts if p)}. Is this the checkpoint of another model?")
        raise CheckpointError(msg)


def _load_dcp(path: pathlib.Path, objects: Mapping[str, Any], kinds: Mapping[str, str],
              manifest: Mapping[str, Any], env: Env) -> None:
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )

    from distlib._safe_unpickle import read_dcp
    from distlib.runtime import is_initialized

    state = _on_cpu(_dcp_state(objects, kinds, "load_state()"), env)
    if not state:
        return
    for name in state:
        if kinds[name] == "model":
            _check_model(name, manifest["models"][name]["tensors"], state[name], path)
    read_dcp(state, path / "dcp", no_dist=not is_initialized(), call="load_state()")
    for name, (module, optimizers) in _pairs(objects, kinds, "load_state()").items():
        if len(optimizers) == 1:
            set_state_dict(module, optimizers[0][1], model_state_dict=state[name],
                           optim_state_dict=state[optimizers[0][0]])
            continue
        set_model_state_dict(module, state[name])
        for opt_name, optimizer in optimizers:
            set_optimizer_state_dict(module, optimizer, state[opt_name])


def _load_small(path: pathlib.Path, objects: Mapping[str, Any], kinds: Mapping[str, str],
                manifest: Mapping[str, Any], env: Env) -> None:
    from distlib._safe_unpickle import load_torch_file

    wanted = {n: o for n, o in objects.items() if kinds[n] == "stateful"}
    wanted |= {n: s for n, s in _scalers(objects, kinds).items() if n in manifest["objects"]}
    if not wanted:
        return
    file = path / "objects.pt"
    saved = load_torch_file(file, file=str(file), call="load_state()",
                            what="a complete torch file of plain state",
                            fix="The checkpoint is damaged or was not written by save_state.")
    missing = sorted(n for n in wanted if not isinstance(saved, Mapping) or n not in saved)
    if missing:
        msg = (f"load_state(): {file} must hold the state of {missing}, as its manifest says, "
               f"but it holds {sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__}. "
               "The checkpoint is damaged or was not written by save_state.")
        raise CheckpointError(msg)
    for name, obj in wanted.items():
        if _is_sharded_loader(obj) and manifest["world_size"] != env.world_size:
            msg = (f"load_state(): the world size must equal the saving job's to resume loader "
                   f"{name!r} mid-epoch, but got {env.world_size} now and "
                   f"{manifest['world_size']} in {path}. Resume with the same number of "
                   "processes, or leave the loader out and start the epoch afresh.")
            raise CheckpointError(msg)
        obj.load_state_dict(saved[name])


def _is_sharded_loader(obj: Any) -> bool:
    return type(obj).__name__ == "ShardedLoader"


def _check_rng_state(state: Any) -> None:
    """Raise TypeError/ValueError unless ``state`` has the layout `_rng_state` writes."""
    import torch

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


def _load_rng(path: pathlib.Path, env: Env, manifest: Mapping[str, Any]) -> None:
    from distlib._safe_unpickle import load_torch_file

    if manifest["world_size"] != env.world_size:
        msg = (f"load_state(): the world size must equal the saving job's to restore each "
               f"rank's random state, but got {env.world_size} now and "
               f"{manifest['world_size']} in {path}. Pass rng=False to keep the current "
               "random state.")
        raise CheckpointError(msg)
    file = path / "rng" / f"rank{env.rank}.pt"
    state = load_torch_file(file, file=str(file), call="load_state()",
                            what="a complete RNG state file", fix="Pass rng=False to skip it.")
    try:
        _check_rng_state(state)
    except (TypeError, ValueError) as exc:
        msg = (f"load_state(): {file} must hold the RNG states save_state writes, but {exc}. "
               "The checkpoint is damaged; pass rng=False to skip it.")
        raise CheckpointError(msg) from None
    _set_rng_state(state)


def _check_engine_files(folder: pathlib.Path) -> None:
    """Scan a DeepSpeed engine's files: DeepSpeed itself loads them with weights_only=False."""
    from distlib._safe_unpickle import DEEPSPEED_GLOBALS, check_torch_globals

    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix in (".pt", ".pth", ".bin"):
            check_torch_globals(file, DEEPSPEED_GLOBALS, call="load_state()", loader="DeepSpeed")


def load_state(path: str | os.PathLike[str], env: Env, *, rng: bool = True,
               **objects: Any) -> dict[str, Any]:
    """Restore what `save_state` saved into the objects passed, by name.

    Models and optimizers load through ``torch.distributed.checkpoint``, so a checkpoint
    saved under one strategy or world size loads under another (FSDP2 -> single, 2 -> 4
    ranks); a sharded loader's position and the RNG states need the same world size.

    Args:
        path: the checkpoint folder.
        env: this process's Env.
        rng: restore this rank's RNG states (python, numpy, torch, CUDA).
        **objects: the objects to fill, under the names they were saved with (a subset is
            fine).

    Returns:
        The plain values that were saved (``{"step": 10}``).

    Raises:
        CheckpointError: the folder is not a complete checkpoint, a name was not saved, a
            model's keys or shapes differ (named in the message), a file is truncated, or the
            world size differs where it matters.

    Effects: joins the process group; loads state into the objects in place.
    """
    from distlib.runtime import initialize
    from distlib.training.wrapped import wrapped_of

    initialize(env)
    folder = _resolve(path)
    manifest = _read_manifest(folder)
    kinds = _classify(objects, "load_state()")
    _check_names(manifest, objects, kinds, folder)
    _load_dcp(folder, objects, kinds, manifest, env)
    for name, obj in objects.items():
        if kinds[name] == "engine":
            _check_engine_files(folder / "deepspeed" / name)
            if not wrapped_of(obj).load_checkpoint(  # type: ignore[union-attr]
                    folder / "deepspeed" / name):
                msg = (f"load_state(): DeepSpeed engine {name!r} must load from "
                       f"{folder / 'deepspeed' / name}, but DeepSpeed found no checkpoint there.")
                raise CheckpointError(msg)
    _load_small(folder, objects, kinds, manifest, env)
    if rng:
        _load_rng(folder, env, manifest)
    barrier(env)
    return dict(manifest["values"])


def check_save_load(env: Env) -> str:
    """`distlib test` check: a save / load round trip under the configured strategy.

    One step of a small model is saved; a differently initialised copy loads it and must hold
    the same weights and optimizer state on every rank.
    """
    import tempfile

    import torch

    from distlib.collectives import broadcast_object
    from distlib.training.wrapping import wrap

    def build(seed: int) -> tuple[Any, Any]:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        return wrap(net, env, optimizer=opt)  # type: ignore[no-any-return]

    def flat(model: Any) -> Any:
        from distlib.export import _full_state

        state = _full_state(model, env)
        return broadcast_object({k: v.float() for k, v in state.items()}, env)

    model, optimizer = build(0)
    loss = model(torch.ones(4, 8, device=env.torch_device)).float().pow(2).mean()
    from distlib.training.step import backward

    backward(loss, model)
    optimizer.step()
    folder = broadcast_object(tempfile.mkdtemp(prefix="distlib-test-") if env.is_main else None,
                              env)
    path = pathlib.Path(folder) / "state"
    save_state(path, env, model=model, optimizer=optimizer, step=1)
    fresh, fresh_optimizer = build(1)
    values = load_state(path, env, model=fresh, optimizer=fresh_optimizer)
    before, after = flat(model), flat(fresh)
    barrier(env)
    if env.is_main:
        shutil.rmtree(folder, ignore_errors=True)
    assert values == {"step": 1}, f"saved values came back as {values}"
    worst = max(float((before[k] - after[k]).abs().max()) for k in before) if before else 0.0
    assert worst == 0.0, f"weights differ after load by {worst:.2e}"
    return f"{env.strategy.name}: saved and loaded {len(before)} tensors exactly"
