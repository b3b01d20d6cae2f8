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
`distlib.checkpoint.rng`'s; what depends on the strategy is asked of `_wrapped`. Each step of
a save runs on every rank, all or none (`_commit`); ``async_save=True`` hands the write and the
commit to a `SaveHandle` (`_async`); ``keep_last`` / ``keep_best`` are `_keep`'s.
"""

from __future__ import annotations

import fnmatch
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

import torch
from torch.distributed.checkpoint import state_dict_saver
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
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
from distlib.checkpoint._async import SaveHandle, check_async, save_async, wait_pending
from distlib.checkpoint._commit import all_or_none, exchange
from distlib.checkpoint._counting import CountingSavePlanner, read_dcp_counting
from distlib.checkpoint._folder import FORMAT
from distlib.checkpoint._keep import check_keep, remove_older
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
from distlib.collectives import barrier
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


@overload
def save_state(path: str | os.PathLike[str], env: Env, *, progress: bool | None = None,
               async_save: Literal[False] = False, keep_last: int | None = None,
               keep_best: tuple[str, str] | None = None, rng: bool = True,
               **objects: Any) -> pathlib.Path: ...


@overload
def save_state(path: str | os.PathLike[str], env: Env, *, progress: bool | None = None,
               async_save: Literal[True], keep_last: int | None = None,
               keep_best: tuple[str, str] | None = None, rng: bool = True,
               **objects: Any) -> SaveHandle: ...


def save_state(path: str | os.PathLike[str], env: Env, *, progress: bool | None = None,
               async_save: bool = False, keep_last: int | None = None,
               keep_best: tuple[str, str] | None = None, rng: bool = True,
               **objects: Any) -> pathlib.Path | SaveHandle:
    """Save models, optimizers, schedulers, loaders, RNG states and plain values, atomically.

    Call it on every rank with the same names. Models and optimizers are saved sharded
    through ``torch.distributed.checkpoint`` (any strategy: single, DDP, FSDP2), DeepSpeed
    engines through their own checkpointing; the GradScaler of an fp16 model is saved with it;
    objects with ``state_dict`` (schedulers, a sharded loader's position) and plain JSON values
    (``step=10``) are saved by rank 0; every rank saves its RNG states (unless ``rng=False``).

    Args:
        path: the checkpoint folder (on a file system all ranks share).
        env: this process's Env.
        progress: a progress bar in bytes on stderr, on the main rank only (counting that
            rank's part of the tensors): True shows it, False never, None (the default) when
            stderr is a terminal and the save has lasted 2 seconds. Not with ``async_save``.
        async_save: return a `SaveHandle` once the tensors are staged to CPU memory; DCP
            writes them in the background and the checkpoint is committed (manifest, swap,
            housekeeping) when every rank's write finished. Not for DeepSpeed engines or XLA.
        keep_last: after the save commits, keep only this many of the newest checkpoints of
            ``path``'s series (siblings named like ``path`` but for a trailing number:
            ``step_100``, ``step_200``), this one included; None keeps all.
        keep_best: ``(name, "min" | "max")``: a number saved in the same call (``loss=0.3``);
            the series' checkpoint with the best value is never removed by ``keep_last``.
        rng: save every rank's RNG states (False: a model-only save has no use for them).
        **objects: what to save, by name; ``load_state`` takes the same names (not the
            keywords above).

    Returns:
        The checkpoint folder; with ``async_save=True`` a `SaveHandle` (``.wait()`` returns
        the folder once committed).

    Raises:
        CheckpointError: an object cannot be saved (its type, or an optimizer whose model is
            not passed); ``path`` is a file, or a folder holding files but no checkpoint
            (a save replaces the folder whole); the disk cannot hold the new copy (checked before writing from the
            tensors' sizes) or filled up while writing (the partial folder is then removed):
            the message names the folder and the bytes needed and free. Every rank raises
            when any rank's part failed; an async save raises it from ``wait()``. An earlier
            async save of the same objects that failed unseen raises here.
        TypeError: ``progress``, ``async_save``, ``rng``, ``keep_last`` or ``keep_best`` is
            not of its type.
        ValueError: ``keep_last`` < 1, or ``path``'s name has no trailing number to find its
            series by; ``keep_best`` without ``keep_last`` or naming no saved number;
            ``async_save`` with a progress bar, a DeepSpeed engine or XLA.

    Effects: joins the process group; first waits for a pending async save of the same
    objects; writes ``.<name>.partial`` beside ``path`` and renames
    it to ``path`` when complete (the previous checkpoint is removed only after that; a save
    cut short at any point, any number of times in a row, leaves the last complete checkpoint
    in ``path`` or ``.<name>.old``, where `load_state` finds it); files are created as
    ``open()`` creates them (0644 under umask 022). Under XLA the model and optimizer tensors
    are copied to the CPU first (the graph runs). The main rank may print a progress bar to
    stderr. With ``keep_last`` the main rank removes older checkpoints of the series. An async
    save creates a gloo process group and a thread, both gone after ``wait()``.

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
    _check_flag(async_save, "async_save", call)
    _check_flag(rng, "rng", call)
    initialize(env)
    path = pathlib.Path(os.path.abspath(path))
    kinds = _classify(objects, call)
    check_keep(path, keep_last, keep_best, _values(objects, kinds))
    if async_save:
        check_async(env, kinds, progress)
    wait_pending(_holders(objects, kinds))
    folders.refuse_foreign(path)
    staging = path.parent / f".{path.name}.partial"
    state, small = _collect(objects, kinds, env, call)
    needed = folders.tensor_bytes(state, small)
    refusal = folders.prepare_staging(staging, path, needed) if env.is_main else None
    refusals = [r for r in exchange(env, refusal) if r is not None]
    if refusals:
        raise CheckpointError(refusals[0])
    manifest = _manifest(env, objects, kinds, state, small, rng)

    def finish() -> None:
        if env.is_main:
            folders.write_manifest(staging, manifest)
            folders.swap_into_place(staging, path)
            if keep_last is not None:
                remove_older(path, keep_last, keep_best)

    def write_small(bar: ByteBar | None) -> None:
        _save_small(staging, env, objects, kinds, small, bar)
        if rng:
            save_rng_state(staging, env.rank)

    if async_save:
        return save_async(path, staging, env, state, needed, write_small, finish,
                          _holders(objects, kinds))
    desc = "saving state" if env.world_size == 1 else f"saving state (rank {env.rank}'s part)"
    with ByteBar(desc, progress=progress, main=env.is_main) as bar:
        def write() -> None:
            bar.grow(folders.tensor_bytes(small) if env.is_main and small else 0)
            if state:
                with folders.quiet_single_process():
                    state_dict_saver.save(dict(state), checkpoint_id=staging / "dcp",
                                          no_dist=not env.is_distributed,
                                          planner=CountingSavePlanner(bar))
            write_small(bar)

        all_or_none(env, write, staging, path, needed)
    all_or_none(env, finish, staging, path, needed)
    return path


def _check_flag(value: Any, name: str, call: str) -> None:
    if not isinstance(value, bool):
        msg = (f"{call}: {name} must be True or False, but got {value!r} "
               f"({type(value).__name__}). Pass {name}=True or {name}=False.")
        raise TypeError(msg)


def _values(objects: Mapping[str, Any], kinds: Mapping[str, str]) -> dict[str, Any]:
    return {n: o for n, o in objects.items() if kinds[n] == "value"}


def _holders(objects: Mapping[str, Any], kinds: Mapping[str, str]) -> list[Any]:
    """The objects a pending async save is remembered on: unwrapped models, torch optimizers."""
    held: list[Any] = []
    for name, obj in objects.items():
        if kinds[name] == "model":
            held.append(unwrap(obj))
        elif kinds[name] == "optimizer":
            held.append(_inner_optimizer(obj))
    return held


def _collect(objects: Mapping[str, Any], kinds: Mapping[str, str], env: Env,
             call: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DCP state (models, optimizers) and the small state dicts rank 0 saves."""
    state = _on_cpu(_dcp_state(objects, kinds, call), env)
    small = {n: o.state_dict() for n, o in objects.items() if kinds[n] == "stateful"}
    small |= {n: s.state_dict() for n, s in _scalers(objects, kinds).items()}
    return state, small


def _save_small(staging: pathlib.Path, env: Env, objects: Mapping[str, Any],
                kinds: Mapping[str, str], small: Mapping[str, Any], bar: ByteBar | None) -> None:
    """Write the DeepSpeed engines' own files and ``objects.pt`` (its tensors count in ``bar``;
    an engine's files are not counted)."""
    for name, obj in objects.items():
        if kinds[name] == "engine":
            _save_itself(obj, staging / "deepspeed" / name)
    if env.is_main and small:
        with open(staging / "objects.pt", "wb") as handle:
            torch.save(dict(small), handle)
        if bar is not None:
            bar.update(folders.tensor_bytes(small))


def _manifest(env: Env, objects: Mapping[str, Any], kinds: Mapping[str, str],
              state: Mapping[str, Any], small: Mapping[str, Any], rng: bool) -> dict[str, Any]:
    """What the manifest says; ``saved_at_ns`` orders a series (`distlib.checkpoint._keep`)."""
    return {
        "format": FORMAT,
        "saved_at_ns": time.time_ns(),
        "world_size": env.world_size,
        "dp_size": env.mesh.dp_size,  # the ranks batches were dealt over (a loader's position)
        "strategy": env.strategy.name,
        "kinds": dict(kinds),
        "values": _values(objects, kinds),
        "models": {n: {"tensors": folders.describe_tensors(state[n]),
                       "tied": _tied_names(objects[n])}
                   for n in objects if kinds[n] == "model"},
        "objects": sorted(small),
        "rng": rng,
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


def _check_exclude(exclude: Any, manifest: Mapping[str, Any], state: Mapping[str, Any],
                   kinds: Mapping[str, str]) -> tuple[str, ...]:
    """The glob patterns of ``exclude``, each matching some model key (saved or passed)."""
    call = "load_state()"
    if isinstance(exclude, str) or not isinstance(exclude, Sequence) or not all(
            isinstance(p, str) for p in exclude):
        msg = (f"{call}: exclude must be a tuple of glob patterns over model keys, but got "
               f"{exclude!r}. Pass e.g. exclude=('lm_head.*',) (a tuple, even of one).")
        raise TypeError(msg)
    keys = {k for name, kind in kinds.items() if kind == "model"
            for k in [*manifest["models"][name]["tensors"], *state.get(name, {})]}
    for pattern in exclude:
        if not fnmatch.filter(keys, pattern):
            near = sorted(keys)[:8]
            msg = (f"{call}: every exclude pattern must match a model key, but got {pattern!r}, "
                   f"which matches none of the {len(keys)} keys (e.g. {near}). Check the "
                   "pattern against the model's state_dict() keys.")
            raise ValueError(msg)
    return tuple(exclude)


def _drop(state: dict[str, Any], patterns: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in state.items()
            if not any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def _exclude_keys(state: dict[str, Any], kinds: Mapping[str, str],
                  patterns: tuple[str, ...]) -> None:
    """Drop the excluded model keys, and their optimizers' state, from the DCP request."""
    for name, value in state.items():
        if kinds[name] == "model":
            state[name] = _drop(value, patterns)
        elif kinds[name] == "optimizer" and isinstance(value.get("state"), dict):
            value["state"] = _drop(value["state"], patterns)


def _load_dcp(path: pathlib.Path, objects: Mapping[str, Any], kinds: Mapping[str, str],
              manifest: Mapping[str, Any], env: Env, progress: bool | None,
              exclude: Any) -> None:
    state = _on_cpu(_dcp_state(objects, kinds, "load_state()"), env)
    patterns = _check_exclude(exclude, manifest, state, kinds)
    if not state:
        return
    _exclude_keys(state, kinds, patterns)
    for name in state:
        if kinds[name] == "model":
            expected = _drop(manifest["models"][name]["tensors"], patterns)
            _check_model(name, expected, state[name], path)
    groups = {n: [list(g["params"]) for g in v["param_groups"]]
              for n, v in state.items() if kinds[n] == "optimizer" and "param_groups" in v}
    with ByteBar("loading state", progress=progress, main=env.is_main) as bar:
        read_dcp_counting(state, path / "dcp", no_dist=not is_initialized(), call="load_state()",
                          bar=bar)
    for name, params in groups.items():  # the saved groups' lists name the saved model's keys
        for group, own in zip(state[name]["param_groups"], params, strict=False):
            group["params"] = own
    options = StateDictOptions(strict=not patterns)
    for name, (module, optimizers) in _pairs(objects, kinds, "load_state()").items():
        if len(optimizers) == 1:
            set_state_dict(module, optimizers[0][1], model_state_dict=state[name],
                           optim_state_dict=state[optimizers[0][0]], options=options)
            continue
        set_model_state_dict(module, state[name], options=options)
        for opt_name, optimizer in optimizers:
            set_optimizer_state_dict(module, optimizer, state[opt_name], options=options)


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


def load_state(path: str | os.PathLike[str], env: Env, *, rng: bool | None = None,
               progress: bool | None = None, exclude: Sequence[str] = (),
               **objects: Any) -> dict[str, Any]:
    """Restore what `save_state` saved into the objects passed, by name.

    Models and optimizers load through ``torch.distributed.checkpoint``, so a checkpoint
    saved under one strategy or world size loads under another (FSDP2 -> single, 2 -> 4
    ranks); a sharded loader resumes its epoch at any data-parallel size, every sample read
    once (its ``load_state_dict``), and at another world size each rank's RNG is seeded
    from the checkpoint and its rank (`distlib.checkpoint.rng`).

    Args:
        path: the checkpoint folder.
        env: this process's Env.
        rng: restore this rank's RNG states (python, numpy, torch, CUDA): None (the
            default) when the checkpoint holds them (not one saved with ``rng=False``), True
            requires them, False keeps the current ones.
        progress: a progress bar in bytes on stderr, on the main rank only (the model and
            optimizer tensors it reads): True shows it, False never, None (the default) when
            stderr is a terminal and the load has lasted 2 seconds.
        exclude: glob patterns (``fnmatch``) over model keys that are neither loaded nor
            required, with their optimizer state (``("lm_head.*",)``: a new head on a saved
            body); each must match a key of the checkpoint or of a model passed.
        **objects: the objects to fill, under the names they were saved with (a subset is
            fine).

    Returns:
        The plain values that were saved (``{"step": 10}``).

    Raises:
        CheckpointError: the folder is not a complete checkpoint, a name was not saved, a
            model's keys or shapes differ (named in the message), or a file is truncated;
            ``rng=True`` but the checkpoint holds no RNG states.
        ShardingError: a loader's saved position cannot resume here (another pass length, or
            an older distlib's position at another data-parallel size).
        TypeError: ``progress`` or ``rng`` is not True, False or None; ``exclude`` is not a
            sequence of strings.
        ValueError: an ``exclude`` pattern matches no model key (the pattern is named).

    Effects: joins the process group; first waits for a pending async save of the same
    objects; loads state into the objects in place; the main rank may print a progress bar
    to stderr.
    """
    call = "load_state()"
    progress = check_progress(progress, call)
    if rng is not None:
        _check_flag(rng, "rng", call)
    initialize(env)
    kinds = _classify(objects, call)
    wait_pending(_holders(objects, kinds))
    folder = folders.resolve(path)
    manifest = folders.read_manifest(folder)
    _check_names(manifest, objects, kinds, folder)
    _load_dcp(folder, objects, kinds, manifest, env, progress, exclude)
    for name, obj in objects.items():
        if kinds[name] == "engine":
            _check_own_files(folder / "deepspeed" / name)
            if not _load_itself(obj, folder / "deepspeed" / name):
                msg = (f"load_state(): DeepSpeed engine {name!r} must load from "
                       f"{folder / 'deepspeed' / name}, but DeepSpeed found no checkpoint there.")
                raise CheckpointError(msg)
    _load_small(folder, objects, kinds, manifest, env)
    saved_rng = manifest.get("rng", True)
    if rng and not saved_rng:
        msg = (f"{call}: rng must be None or False for a checkpoint saved with rng=False, but "
               f"got rng=True and {folder} holds no RNG states. Drop rng=True.")
        raise CheckpointError(msg)
    if saved_rng and rng is not False:
        load_rng_state(folder, env, manifest)
    barrier(env)
    return dict(manifest["values"])
