"""Full-weights export to safetensors, from a live model or offline from a checkpoint.

The export is what `distlib.load_checkpoint` and transformers' ``from_pretrained`` read:
``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards with a
``model.safetensors.index.json``. Tied weights are written once (safetensors refuses tensors
that share memory); loaders tie them again. ``distlib merge-weights`` is the offline form.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from distlib.env import Env
from distlib.errors import CheckpointError

__all__ = ["add_arguments", "export_weights", "merge_weights", "run", "write_safetensors"]

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
                      dtype: Any = None) -> pathlib.Path:
    """Write a state dict as (sharded) safetensors with an index, atomically.

    Args:
        state: name -> tensor (any device).
        out: the folder to write; replaced as a whole when complete.
        tied: groups of names that share one tensor; only the first of each is written.
        max_shard_size: bytes, or a size such as ``"5GB"``.
        dtype: convert floating tensors to this dtype (``None``: keep).

    Returns:
        The folder.

    Effects: writes ``.<name>.partial`` beside ``out`` and renames it to ``out``.
    """
    from safetensors.torch import save_file

    from distlib.big_model.sizes import parse_size
    from distlib.checkpoint import _swap_into_place

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
    for file, keys in zip(names, shards, strict=True):
        save_file({k: tensors[k] for k in keys}, staging / file, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {k: f for f, keys in zip(names, shards, strict=True) for k in keys}}
        (staging / INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    _swap_into_place(staging, out)
    return out


def _full_state(model: Any, env: Env) -> dict[str, Any]:
    """The whole model's tensors on the CPU of rank 0 (other ranks: empty)."""
    from distlib.strategies._handle import handle_of
    from distlib.strategies.base import unwrap

    handle = handle_of(model)
    module = unwrap(model)
    if handle is not None and handle.engine is not None:
        import deepspeed

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None,
                                               enabled=handle.engine.zero_optimization_stage() == 3):
            state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        return state if env.is_main else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    return state if env.is_main else {}


def export_weights(model: Any, out: str | os.PathLike[str], env: Env, *,
                   max_shard_size: int | str = "5GB", dtype: Any = None) -> pathlib.Path:
    """Gather the full weights of a (wrapped) model and write them as safetensors on rank 0.

    Works for every strategy: FSDP2 shards and ZeRO-3 partitions are gathered first. Call it
    on every rank.

    Examples:
        >>> import torch, tempfile, os, distlib as dl
        >>> from distlib.export import export_weights
        >>> out = export_weights(torch.nn.Linear(2, 2), os.path.join(tempfile.mkdtemp(), "w"), dl.Env())
        >>> sorted(os.listdir(out))
        ['model.safetensors']

    Effects: joins the process group; rank 0 writes ``out`` atomically.
    """
    from distlib.checkpoint import _tied_names
    from distlib.collectives import barrier
    from distlib.runtime import initialize

    initialize(env)
    state = _full_state(model, env)
    if env.is_main:
        write_safetensors(state, out, tied=_tied_names(model), max_shard_size=max_shard_size,
                          dtype=dtype)
    barrier(env)
    return pathlib.Path(os.path.abspath(out))


def merge_weights(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], *,
                  name: str = "model", max_shard_size: int | str = "5GB",
                  dtype: Any = None) -> pathlib.Path:
    """Turn the sharded model of a `save_state` checkpoint into a safetensors export, offline.

    Needs no process group and any number of processes' shards; holds the model in memory.

    Raises:
        CheckpointError: the folder is not a checkpoint, or holds no model ``name``.
    """
    import torch
    from torch.distributed.checkpoint import state_dict_loader

    from distlib.checkpoint import _quiet_single_process, _read_manifest, _resolve

    folder = _resolve(checkpoint)
    manifest = _read_manifest(folder)
    models = manifest["models"]
    if name not in models:
        msg = (f"merge_weights(): name must be a model saved in {folder}, but got {name!r}; "
               f"it holds {sorted(models) or 'no model'}. Pass --name with one of those.")
        raise CheckpointError(msg)
    tensors = {key: torch.empty(shape, dtype=getattr(torch, dt))
               for key, (shape, dt) in models[name]["tensors"].items()}
    with _quiet_single_process():
        state_dict_loader.load({name: tensors}, checkpoint_id=folder / "dcp", no_dist=True)
    return write_safetensors(tensors, out, tied=models[name]["tied"],
                             max_shard_size=max_shard_size, dtype=dtype)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distlib merge-weights``."""
    parser.add_argument("checkpoint", help="a folder written by save_state")
    parser.add_argument("out", help="the folder to write the safetensors export to")
    parser.add_argument("--name", default="model", help="which saved model (default: model)")
    parser.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="convert floating weights")


def run(args: argparse.Namespace) -> int:
    """``distlib merge-weights CHECKPOINT OUT``."""
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    out = merge_weights(args.checkpoint, args.out, name=args.name,
                        max_shard_size=args.max_shard_size, dtype=dtypes.get(args.dtype or ""))
    files = sorted(os.listdir(out))
    print(f"wrote {len(files)} file(s) to {out}: {', '.join(files)}")
    return 0
