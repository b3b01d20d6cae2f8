"""Full-weights export to safetensors, from a live model or offline from a checkpoint.

`save_model` is Accelerate's ``save_model``: the weights (and a transformers config) into a
folder the user owns. The export is what `distlib.load_checkpoint` and transformers'
``from_pretrained`` read:
``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards with a
``model.safetensors.index.json``. Tied weights are written once (safetensors refuses tensors
that share memory); loaders tie them again. `merge_weights` (``distlib merge-weights``) is
the offline form. The checkpoint folder it reads is `distlib.checkpoint._folder`'s format;
gathering a wrapped model's full weights is asked of `distlib.checkpoint._wrapped`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import save_file

from distlib._progress import ByteBar, check_progress
from distlib.big_model.sizes import parse_size
from distlib.checkpoint import _folder as folders
from distlib.checkpoint._counting import read_dcp_counting
from distlib.checkpoint._wrapped import _full_state, _tied_names
from distlib.collectives import barrier
from distlib.env import Env
from distlib.errors import CheckpointError, ConfigError
from distlib.runtime import initialize
from distlib.training.wrapping import unwrap

__all__ = ["export_weights", "merge_weights", "parse_shard_size", "save_model",
           "write_safetensors"]

INDEX = "model.safetensors.index.json"


def _plan_shards(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Group keys, in order, into shards of at most ``max_bytes`` (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def write_safetensors(state: Mapping[str, Any], out: str | os.PathLike[str], *,
                      tied: Sequence[Sequence[str]] = (), max_shard_size: int | str = "5GB",
                      dtype: Any = None, progress: bool | None = False) -> pathlib.Path:
    """Write a state dict as (sharded) safetensors with an index, atomically.

    The files get the mode a plain ``open()`` gives (``0o666 & ~umask``: 0644 under umask 022),
    not the 0600 of safetensors' private temporary file: an export is for others to read.

    Args:
        state: name -> tensor (any device).
        out: the folder to write; replaced as a whole when complete.
        tied: groups of names that share one tensor; only the first of each is written.
        max_shard_size: bytes, or a size such as ``"5GB"``.
        dtype: convert floating tensors to this dtype (``None``: keep).
        progress: a progress bar in bytes on stderr, counted per file: True shows it, False
            (the default) never, None when stderr is a terminal and the work has lasted 2 s.

    Returns:
        The folder.

    Effects: writes ``.<name>.partial`` beside ``out`` and renames it to ``out``; may print
    a progress bar to stderr.
    """
    drop = {name for group in tied for name in list(group)[1:]}
    tensors = {}
    for key, value in state.items():
        if key in drop:
            continue
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    out = pathlib.Path(os.path.abspath(out))
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    shards = _plan_shards(sizes, parse_size(max_shard_size, source="max_shard_size"))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    mode = folders.creation_mode(staging)
    with ByteBar("writing safetensors", progress=progress) as bar:
        bar.grow(sum(sizes.values()))
        for file, keys in zip(names, shards, strict=True):
            save_file({k: tensors[k] for k in keys}, staging / file, metadata={"format": "pt"})
            os.chmod(staging / file, mode)
            bar.update(sum(sizes[k] for k in keys))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {k: f for f, keys in zip(names, shards, strict=True) for k in keys}}
        (staging / INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    folders.swap_into_place(staging, out)
    return out


def export_weights(model: Any, out: str | os.PathLike[str], env: Env, *,
                   max_shard_size: int | str = "5GB", dtype: Any = None) -> pathlib.Path:
    """Gather the full weights of a (wrapped) model and write them as safetensors on rank 0.

    Works for every strategy: FSDP2 shards and ZeRO-3 partitions are gathered first. Call it
    on every rank.

    Examples:
        >>> import torch, tempfile, os, distlib as dl
        >>> from distlib.checkpoint import export_weights
        >>> out = export_weights(torch.nn.Linear(2, 2), os.path.join(tempfile.mkdtemp(), "w"), dl.Env())
        >>> sorted(os.listdir(out))
        ['model.safetensors']

    Effects: joins the process group; rank 0 writes ``out`` atomically.
    """
    initialize(env)
    state = _full_state(model, env)
    if env.is_main:
        write_safetensors(state, out, tied=_tied_names(model), max_shard_size=max_shard_size,
                          dtype=dtype)
    barrier(env)
    return pathlib.Path(os.path.abspath(out))


# Accelerate's units for max_shard_size (utils.modeling.convert_file_size_to_int).
_SHARD_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}
_SHARD_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMG]I?B)\s*$", re.IGNORECASE)
# What save_model writes into (and clears from) the folder; everything else there stays.
_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$")


def parse_shard_size(size: object, *, source: str = "save_model(): max_shard_size") -> int:
    """Bytes from an int or a string such as ``"10GB"``, ``"500MB"``, ``"1GiB"``, as Accelerate.

    ``GB``/``MB``/``KB`` are powers of 1000 and ``GiB``/``MiB``/``KiB`` powers of 1024; a
    lowercase final ``b`` (``"8Mb"``) means bits, as in Accelerate's
    ``convert_file_size_to_int``.

    Raises:
        ConfigError: not a positive int nor such a string.

    Examples:
        >>> parse_shard_size("10GB"), parse_shard_size("1MiB"), parse_shard_size("8Mb")
        (10000000000, 1048576, 1000000)
        >>> parse_shard_size(300)
        300
    """
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = _SHARD_SIZE.match(size) if isinstance(size, str) else None
    if match is not None:
        unit = match.group(2)
        value = int(float(match.group(1)) * _SHARD_UNITS[unit.upper()])
        if unit.upper() in ("GB", "MB", "KB") and unit.endswith("b"):
            value //= 8
        if value > 0:
            return value
    msg = (f"{source} must be a positive int of bytes or a size such as '10GB', '500MB' or "
           f"'1GiB' (units GB, MB, KB, GiB, MiB, KiB), but got {size!r}. E.g. "
           "max_shard_size='5GB'.")
    raise ConfigError(msg)


def _move_into(staging: pathlib.Path, folder: pathlib.Path) -> list[str]:
    """Replace the weight files of ``folder`` with those in ``staging`` (the index last)."""
    for old in folder.iterdir():
        if _WEIGHT_FILE.match(old.name):
            old.unlink()
    names = sorted(p.name for p in staging.iterdir())
    names.sort(key=lambda name: name == INDEX)
    for name in names:
        os.replace(staging / name, folder / name)
    staging.rmdir()
    return names


def save_model(model: Any, folder: str | os.PathLike[str], env: Env, *,
               max_shard_size: int | str = "10GB",
               safe_serialization: bool = True) -> pathlib.Path:
    """Write a model's full weights into ``folder`` as transformers does, from rank 0.

    Accelerate's ``accelerator.save_model``: ``model.safetensors``, or
    ``model-0000k-of-0000n.safetensors`` shards of at most ``max_shard_size`` with
    ``model.safetensors.index.json``; for a transformers model also its ``config.json``, so
    that ``from_pretrained(folder)`` loads it. FSDP2 shards and ZeRO-3 partitions are
    gathered first (`export_weights`). Call it on every rank. Other files in ``folder``
    (a tokenizer, a README) stay; weight files of an earlier save are replaced.

    Args:
        model: the model returned by ``wrap`` (or a plain module).
        folder: where to write; created if missing.
        env: this process's Env.
        max_shard_size: the largest shard, in bytes or as ``"10GB"``, ``"500MB"``,
            ``"1GiB"`` (`parse_shard_size`).
        safe_serialization: must be True: distlib writes safetensors only (a pickled
            ``pytorch_model.bin`` runs code when loaded).

    Returns:
        The folder.

    Raises:
        ConfigError: a bad ``max_shard_size``, ``safe_serialization`` not True, or ``folder``
            an existing file.

    Examples:
        >>> import torch, tempfile, os, distlib as dl
        >>> out = save_model(torch.nn.Linear(2, 2), tempfile.mkdtemp(), dl.Env())
        >>> sorted(os.listdir(out))
        ['model.safetensors']

    Effects: joins the process group; gathers the weights; rank 0 writes the files (each
    shard complete before it is moved in, the index last); a barrier ends the call.
    """
    if safe_serialization is not True:
        msg = (f"save_model(): safe_serialization must be True (distlib writes safetensors "
               f"only), but got {safe_serialization!r}. Drop the argument: transformers and "
               "distlib.load_checkpoint read model.safetensors.")
        raise ConfigError(msg)
    size = parse_shard_size(max_shard_size)
    folder = pathlib.Path(os.path.abspath(folder))
    if folder.exists() and not folder.is_dir():
        msg = (f"save_model(): folder must be a directory (or not exist yet), but got the file "
               f"{str(folder)!r}. Pass a folder path, e.g. {str(folder.with_suffix(''))!r}.")
        raise ConfigError(msg)
    staging = folder / ".save_model"
    export_weights(model, staging, env, max_shard_size=size)
    if env.is_main:
        _move_into(staging, folder)
        config: Any = getattr(unwrap(model), "config", None)
        if hasattr(config, "save_pretrained"):
            config.save_pretrained(folder)
    barrier(env)
    return folder


def merge_weights(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], *,
                  name: str = "model", max_shard_size: int | str = "5GB",
                  dtype: Any = None, progress: bool | None = None) -> pathlib.Path:
    """Turn the sharded model of a `save_state` checkpoint into a safetensors export, offline.

    Needs no process group and any number of processes' shards; holds the model in memory.
    The files are written as `write_safetensors` writes them (0644 under umask 022).

    Args:
        checkpoint: a folder written by `save_state`.
        out: the folder to write; replaced as a whole when complete.
        name: which saved model.
        max_shard_size: bytes, or a size such as ``"5GB"``.
        dtype: convert floating tensors to this dtype (``None``: keep).
        progress: two progress bars in bytes on stderr, reading the shards (per tensor) and
            writing safetensors (per file): True shows them, False never, None (the default)
            when stderr is a terminal and each has lasted 2 s (``distlib merge-weights`` shows
            them from the start in a terminal).

    Returns:
        The folder written.

    Raises:
        CheckpointError: the folder is not a checkpoint, or holds no model ``name``.
        TypeError: ``progress`` is not True, False or None.

    Effects: reads ``checkpoint``; writes ``out`` atomically; may print to stderr.
    """
    progress = check_progress(progress, "merge_weights()")
    folder = folders.resolve(checkpoint)
    manifest = folders.read_manifest(folder)
    models = manifest["models"]
    if name not in models:
        msg = (f"merge_weights(): name must be a model saved in {folder}, but got {name!r}; "
               f"it holds {sorted(models) or 'no model'}. Pass --name with one of those.")
        raise CheckpointError(msg)
    tensors = {key: torch.empty(shape, dtype=getattr(torch, dt))
               for key, (shape, dt) in models[name]["tensors"].items()}
    with folders.quiet_single_process(), ByteBar("reading checkpoint", progress=progress) as bar:
        read_dcp_counting({name: tensors}, folder / "dcp", no_dist=True, call="merge_weights()",
                          bar=bar)
    return write_safetensors(tensors, out, tied=models[name]["tied"],
                             max_shard_size=max_shard_size, dtype=dtype, progress=progress)
