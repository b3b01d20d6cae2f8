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

The folder format (staging, manifest, swap) is `distlib.checkpoint._folder`'s, the RNG files
`distlib.checkpoint.rng`'s; what depends on the strategy is asked of `_wrapped`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint import state_dict_saver
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from distlib._progress import ByteBar, check_progress
from distlib._safe_unpickle import load_torch_file
from distlib.checkpoint import _folder as folders
from distlib.checkpoint._counting import CountingSavePlanner, read_dcp_counting
from distlib.checkpoint._folder import FORMAT
from distlib.checkpoint._wrapped import (
    _check_own_files,
    _inner_optimizer,
    _is_saved_with_model,
    _load_itself,
    _on_cpu,
    _save_itself,
    _saves_itself,
    _scaler_of,
    _tied_names,
)
from distlib.checkpoint.rng import load_rng_state, save_rng_state
from distlib.collectives import barrier, gather_object
from distlib.data import ShardedLoader
from distlib.env import Env
from distlib.errors import CheckpointError
from distlib.runtime import initialize, is_initialized
from distlib.training.wrapping import unwrap

__all__ = ["load_state", "save_state"]

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
    """name -> "engine" | "model" | "engine-optimizer" | "optimizer" | "stateful" | "value".

    The kinds are written to the manifest: a name loads only into an object of its kind.
    """
    kinds: dict[str, str] = {}
    for name, obj in objects.items():
        if _saves_itself(obj):
            kinds[name] = "engine"
        elif isinstance(obj, torch.nn.Module):
            kinds[name] = "model"
        elif _is_saved_with_model(obj):
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


def _owner(optimizer: Any, models: Mapping[str, Any], name: str, call: str) -> Any:
    """The model (unwrapped) whose parameters ``optimizer`` updates."""
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
    out = {}
    for name, obj in objects.items():
        scaler = _scaler_of(obj) if kinds[name] == "model" else None
        if scaler is not None:
            out[f"{name}.scaler"] = scaler
    return out


def save_state(path: str | os.PathLike[str], env: Env, *, progress: bool | None = None,
               **objects: Any) -> pathlib.Path:
    """Save models, optimizers, schedulers, loaders, RNG states and plain values, atomically.

    Call it on every rank with the same names. Models and optimizers are saved sharded
    through ``torch.distributed.checkpoint`` (any strategy: single, DDP, FSDP2), DeepSpeed
    engines through their own checkpointing; the GradScaler of an fp16 model is saved with it;
    objects with ``state_dict`` (schedulers, a sharded loader's position) and plain JSON values
    (``step=10``) are saved by rank 0; every rank saves its RNG states.

    Args:
        path: the checkpoint folder (on a file system all ranks share).
        env: this process's Env.
        progress: a progress bar in bytes on stderr, on the main rank only (counting that
            rank's part of the tensors): True shows it, False never, None (the default) when
            stderr is a terminal and the save has lasted 2 seconds.
        **objects: what to save, by name; ``load_state`` takes the same names (not
            ``progress``: that is the switch above).

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointError: an object cannot be saved (its type, or an optimizer whose model is
            not passed); ``path`` is a file, or a folder holding files but no checkpoint
            (a save replaces the folder whole); the disk cannot hold the new copy (checked before writing from the
            tensors' sizes) or filled up while writing (the partial folder is then removed):
            the message names the folder and the bytes needed and free. Every rank raises
            when any rank's part failed.
        TypeError: ``progress`` is not True, False or None.

    Effects: joins the process group; writes ``.<name>.partial`` beside ``path`` and renames
    it to ``path`` when complete (the previous checkpoint is removed only after that; a save
    cut short at any point, any number of times in a row, leaves the last complete checkpoint
    in ``path`` or ``.<name>.old``, where `load_state` finds it); files are created as
    ``open()`` creates them (0644 under umask 022). Under XLA the model and optimizer tensors
    are copied to the CPU first (the graph runs). The main rank may print a progress bar to
    stderr.

    Examples:
        >>> import torch, distlib as dl, tempfile, os
        >>> model = torch.nn.Linear(2, 2)
        >>> folder = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> _ = dl.save_state(folder, dl.Env(), model=model, step=3)
        >>> dl.load_state(folder, dl.Env(), model=model)["step"]
        3
    """
    call = "save_state()"
    progress = check_progress(progress, call)
    initialize(env)
    path = pathlib.Path(os.path.abspath(path))
    folders.refuse_foreign(path)
    kinds = _classify(objects, call)
    staging = path.parent / f".{path.name}.partial"
    state, small = _collect(objects, kinds, env, call)
    needed = folders.tensor_bytes(state, small)
    refusal = folders.prepare_staging(staging, path, needed) if env.is_main else None
    refusals = [r for r in _exchange(env, refusal) if r is not None]
    if refusals:
        raise CheckpointError(refusals[0])

    desc = "saving state" if env.world_size == 1 else f"saving state (rank {env.rank}'s part)"
    with ByteBar(desc, progress=progress, main=env.is_main) as bar:
        def write() -> dict[str, Any]:
            manifest = _save_parts(staging, env, objects, kinds, state, small, bar)
            save_rng_state(staging, env.rank)
            return manifest

        manifest = _all_or_none(env, write, staging, path, needed)

    def finish() -> None:
        if env.is_main:
            folders.write_manifest(staging, manifest)
            folders.swap_into_place(staging, path)

    _all_or_none(env, finish, staging, path, needed)
    return path


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
                small: Mapping[str, Any], bar: ByteBar) -> dict[str, Any]:
    """Write every part but the RNG states and the manifest; return the manifest.

    ``bar`` counts the DCP tensors (this rank's part) and ``objects.pt``'s tensors; a DeepSpeed
    engine's own files are not counted.
    """
    small_bytes = folders.tensor_bytes(small) if env.is_main and small else 0
    bar.grow(small_bytes)
    if state:
        with folders.quiet_single_process():
            state_dict_saver.save(dict(state), checkpoint_id=staging / "dcp",
                                  no_dist=not env.is_distributed,
                                  planner=CountingSavePlanner(bar))
    for name, obj in objects.items():
        if kinds[name] == "engine":
            _save_itself(obj, staging / "deepspeed" / name)
    if env.is_main and small:
        with open(staging / "objects.pt", "wb") as handle:
            torch.save(dict(small), handle)
        bar.update(small_bytes)
    return {
        "format": FORMAT,
        "world_size": env.world_size,
        "dp_size": env.mesh.dp_size,  # the ranks batches were dealt over (a loader's position)
        "strategy": env.strategy.name,
        "kinds": dict(kinds),
        "values": {n: o for n, o in objects.items() if kinds[n] == "value"},
        "models": {n: {"tensors": folders.describe_tensors(state[n]),
                       "tied": _tied_names(objects[n])}
                   for n in objects if kinds[n] == "model"},
        "objects": sorted(small),
    }


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
    got = folders.describe_tensors(state)
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
              manifest: Mapping[str, Any], env: Env, progress: bool | None) -> None:
    state = _on_cpu(_dcp_state(objects, kinds, "load_state()"), env)
    if not state:
        return
    for name in state:
        if kinds[name] == "model":
            _check_model(name, manifest["models"][name]["tensors"], state[name], path)
    with ByteBar("loading state", progress=progress, main=env.is_main) as bar:
        read_dcp_counting(state, path / "dcp", no_dist=not is_initialized(), call="load_state()",
                          bar=bar)
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
        state = saved[name]
        if isinstance(obj, ShardedLoader) and isinstance(state, Mapping) \
                and "dp_size" not in state:
            # An older loader state counts steps dealt over the saving job's data-parallel
            # ranks (every rank, before meshes): say how many, so that the loader refuses
            # another size instead of resuming elsewhere in the epoch. Newer states carry a
            # global position, which the loader re-deals at any data-parallel size.
            state = {**state, "dp_size": manifest.get("dp_size", manifest["world_size"])}
        obj.load_state_dict(state)


def load_state(path: str | os.PathLike[str], env: Env, *, rng: bool = True,
               progress: bool | None = None, **objects: Any) -> dict[str, Any]:
    """Restore what `save_state` saved into the objects passed, by name.

    Models and optimizers load through ``torch.distributed.checkpoint``, so a checkpoint
    saved under one strategy or world size loads under another (FSDP2 -> single, 2 -> 4
    ranks); a sharded loader resumes its epoch at any data-parallel size, every sample read
    once (its ``load_state_dict``), and at another world size each rank's RNG is seeded
    from the checkpoint and its rank (`distlib.checkpoint.rng`).

    Args:
        path: the checkpoint folder.
        env: this process's Env.
        rng: restore this rank's RNG states (python, numpy, torch, CUDA).
        progress: a progress bar in bytes on stderr, on the main rank only (the model and
            optimizer tensors it reads): True shows it, False never, None (the default) when
            stderr is a terminal and the load has lasted 2 seconds.
        **objects: the objects to fill, under the names they were saved with (a subset is
            fine).

    Returns:
        The plain values that were saved (``{"step": 10}``).

    Raises:
        CheckpointError: the folder is not a complete checkpoint, a name was not saved, a
            model's keys or shapes differ (named in the message), or a file is truncated.
        ShardingError: a loader's saved position cannot resume here (another pass length, or
            an older distlib's position at another data-parallel size).
        TypeError: ``progress`` is not True, False or None.

    Effects: joins the process group; loads state into the objects in place; the main rank
    may print a progress bar to stderr.
    """
    progress = check_progress(progress, "load_state()")
    initialize(env)
    folder = folders.resolve(path)
    manifest = folders.read_manifest(folder)
    kinds = _classify(objects, "load_state()")
    _check_names(manifest, objects, kinds, folder)
    _load_dcp(folder, objects, kinds, manifest, env, progress)
    for name, obj in objects.items():
        if kinds[name] == "engine":
            _check_own_files(folder / "deepspeed" / name)
            if not _load_itself(obj, folder / "deepspeed" / name):
                msg = (f"load_state(): DeepSpeed engine {name!r} must load from "
                       f"{folder / 'deepspeed' / name}, but DeepSpeed found no checkpoint there.")
                raise CheckpointError(msg)
    _load_small(folder, objects, kinds, manifest, env)
    if rng:
        load_rng_state(folder, env, manifest)
    barrier(env)
    return dict(manifest["values"])
