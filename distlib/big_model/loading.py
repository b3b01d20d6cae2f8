"""`load_checkpoint`: a checkpoint streamed into a model, tensor by tensor, each to its device.

Names, shapes and integrity are checked from the headers (`distlib.big_model.files`) before a
weight is read; peak memory stays near what stays resident plus one tensor; weights planned
for ``"disk"`` become `OffloadSource` values (`distlib.big_model.offload`). Progress is counted
in bytes, one update per tensor, into a `distlib._progress.ByteBar` (main rank, stderr).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from distlib._progress import ByteBar, check_progress, is_shown
from distlib.big_model.device_map import DeviceMap, check_devices_exist, visible_devices
from distlib.big_model.files import (
    FLOATING_DTYPES,
    CheckpointReader,
    OffloadSource,
    checkpoint_files,
)
from distlib.big_model.offload import OFFLOAD_ATTR, offload_tensor, write_offload_index
from distlib.big_model.sharded import sharded_reader, stream_shards
from distlib.big_model.sizes import TensorInfo, dtype_name, keep_in_fp32_of, tied_groups
from distlib.env import Env, Hardware, detect
from distlib.errors import CheckpointError

__all__ = ["load_checkpoint"]


def _model_tensors(model: Any) -> tuple[dict[str, Any], set[str]]:
    """All parameter names (tied ones under every name) and persistent buffers; meta buffers."""
    expected = dict(model.named_parameters(remove_duplicate=False))
    empty: set[str] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        skip: set[str] = getattr(module, "_non_persistent_buffers_set", set())
        for name, buffer in module._buffers.items():
            if buffer is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            if name not in skip:
                expected[full] = buffer
            elif buffer.is_meta:
                empty.add(full)
    return expected, empty


def _mismatch_report(model: Any, expected: Mapping[str, Any], infos: Mapping[str, TensorInfo],
                     groups: Mapping[str, tuple[str, ...]], strict: bool) -> str:
    missing = [n for n in expected if n not in infos and not any(g in infos for g in groups.get(n, ()))
               and (strict or expected[n].is_meta)]
    unexpected = [n for n in infos if n not in expected] if strict else []
    shapes = [f"{n}: checkpoint {list(infos[n].shape)} vs model {list(expected[n].shape)}"
              for n in infos if n in expected and tuple(expected[n].shape) != infos[n].shape]
    # a floating weight cannot take integers (they would replace it unconverted)
    kinds = [f"{n}: checkpoint {infos[n].dtype} vs model {dtype_name(expected[n].dtype)}"
             for n in infos if n in expected and expected[n].is_floating_point()
             and infos[n].dtype not in FLOATING_DTYPES]
    lines = []
    for title, names in (("missing from the checkpoint", missing),
                         ("in the checkpoint but not in the model", unexpected),
                         ("with different shapes", shapes),
                         ("stored as integers where the model holds floats", kinds)):
        if names:
            shown = [f"{n} {list(expected[n].shape)}" if n in expected and ":" not in n else n
                     for n in names[:20]]
            more = f" (and {len(names) - 20} more)" if len(names) > 20 else ""
            lines.append(f"  {len(names)} {title}: {', '.join(shown)}{more}")
    return "\n".join(lines)


def _target_dtype(name: str, current: Any, source: Any, dtype: Any, keep: Sequence[str]) -> Any:
    import torch

    if not source.is_floating_point:
        return source
    if dtype is not None:
        parts = name.split(".")
        if any(k in parts or name.startswith(k + ".") for k in keep):
            return torch.float32
        return dtype
    return current if current.is_floating_point else source


def _resolve_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, dtype_name(dtype))


def _place(model: Any, names: Sequence[str], value: Any) -> None:
    """Put ``value`` under each of ``names`` (one Parameter shared by all tied names)."""
    import torch

    shared = None
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            old = module._parameters[leaf]
            if shared is None:
                shared = torch.nn.Parameter(value, requires_grad=old.requires_grad)
            module._parameters[leaf] = shared
        else:
            module._buffers[leaf] = value


def _torch_device(device: Any) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def load_checkpoint(model: Any, checkpoint: str | os.PathLike[str],
                    device_map: DeviceMap | Mapping[str, Any] | None = None, dtype: Any = None,
                    offload_folder: str | os.PathLike[str] | None = None, *,
                    keep_in_fp32_modules: Sequence[str] | None = None, strict: bool = True,
                    progress: bool | Callable[[int], Any] | None = None, copy: bool = False,
                    env: Env | None = None) -> Any:
    """Load ``checkpoint`` into ``model`` tensor by tensor, each straight to its device.

    Names, shapes and file integrity are checked from the headers before any weight is read.
    CPU weights from safetensors in their stored dtype are not copied: they stay views of a
    private (copy-on-write) memory map of the file, so the checkpoint must not be rewritten
    in place while the model lives (``copy=True`` copies them). Other weights are copied
    once, to their device and dtype, and their pages of the map are dropped right after.
    Tied parameters (stored once in safetensors) get one shared tensor. Weights mapped to
    ``"disk"`` stay on the meta device; where they live is recorded in the model's
    ``distlib_offload`` attribute for `dispatch` (the checkpoint's own safetensors bytes when
    the dtype matches, else a copy written once to ``offload_folder``).

    A model whose parameters are DTensors (after `wrap` with FSDP2 and/or tensor
    parallelism, typically still on the meta device) is loaded shard by shard: each rank
    reads only the slices its shards hold (safetensors byte ranges, straight into its local
    shards on the mesh's device; ``.bin``/``.pt``: rank 0 reads and broadcasts tensor by
    tensor), so no rank holds the full model. Every rank of the mesh must call it; the
    process group is the DTensors' own. ``device_map`` and ``offload_folder`` are refused
    there (see `distlib.big_model.sharded`).

    Args:
        model: the module to fill (usually built under `init_empty_weights`).
        checkpoint: a ``.safetensors``/``.bin``/``.pt`` file, an index ``.json`` or a folder.
        device_map: where each tensor goes (``None``: where it is now, meta -> cpu).
        dtype: the dtype floating weights are converted to; modules in
            ``keep_in_fp32_modules`` (default: the model's ``_keep_in_fp32_modules``) stay
            float32. ``None`` keeps the dtype of the model's own tensors.
        offload_folder: where converted disk-offloaded weights are written.
        keep_in_fp32_modules: module names kept in float32 when ``dtype`` is given.
        strict: also refuse unexpected keys and missing keys of non-meta tensors.
        progress: a progress bar in bytes on stderr, one update per tensor, on the main
            rank only: True shows it, False never, None (the default) when stderr is a
            terminal and the load has lasted 2 seconds. A callable is called with 1 after
            each tensor instead (a progress bar's ``update``, counting tensors).
        copy: copy CPU weights into private memory even when they could stay backed by
            the checkpoint's safetensors pages (copy-on-write memory maps, as
            ``safetensors.torch.load_file`` and ``torch.load(mmap=True)`` give).
        env: this process's Env, for the main-rank test of the progress bar (``None``: the
            launch variables are read with `detect` when a bar would show).

    Returns:
        ``model``, modified in place.

    Raises:
        CheckpointError: the files are missing, corrupt, unsafe or do not match the model;
            ``device_map``/``offload_folder`` for a model with DTensor parameters.
        DeviceMapError: ``device_map`` names a GPU (or MPS) this machine does not have.
        TypeError: ``progress`` is not True, False, None or a callable.

    Effects: reads the files; moves tensors to devices; may write ``offload_folder``; sets the
    model's parameters and buffers and its ``distlib_offload`` attribute; the main rank may
    print a progress bar to stderr. A sharded model: collectives over the default group for
    ``.bin``/``.pt`` files.

    Examples:
        >>> import os, tempfile, torch
        >>> from safetensors.torch import save_file
        >>> folder = tempfile.mkdtemp()
        >>> save_file({"weight": torch.ones(2, 2), "bias": torch.zeros(2)},
        ...           os.path.join(folder, "model.safetensors"))
        >>> with torch.device("meta"):
        ...     layer = torch.nn.Linear(2, 2)
        >>> load_checkpoint(layer, folder).weight.sum().item()
        4.0
    """
    if not callable(progress):
        progress = check_progress(progress, "load_checkpoint()")
    files = checkpoint_files(checkpoint)
    # DTensor parameters (dl.wrap with FSDP2/TP): each rank reads only its shards
    sharded = sharded_reader(model, files, device_map, offload_folder)
    reader = sharded or CheckpointReader(files)
    infos = reader.infos()
    expected, empty = _model_tensors(model)
    groups = {n: g for g in tied_groups(model) for n in g}
    report = _mismatch_report(model, expected, infos, groups, strict)
    if report or empty:
        extra = (f"\n  {len(empty)} non-persistent buffers on the meta device that no "
                 f"checkpoint holds: {sorted(empty)[:10]} (build the model with "
                 "init_empty_weights(include_buffers=False))") if empty else ""
        msg = (f"load_checkpoint(): the checkpoint must match the model "
               f"{type(model).__name__}, but {', '.join(files)[:300]} does not:\n{report}{extra}\n"
               "Is this the checkpoint of another model or another config?")
        raise CheckpointError(msg)
    dmap = None if device_map is None else DeviceMap.of(device_map)
    if dmap is not None:
        check_devices_exist(dmap, *visible_devices(), source="load_checkpoint()")
    stream = (model, reader, expected, groups, dmap, _resolve_dtype(dtype),
              keep_in_fp32_of(model, keep_in_fp32_modules), offload_folder)
    into: Callable[..., None] = _stream_into
    if sharded is not None:
        into = functools.partial(stream_shards, target_dtype=_target_dtype)
    if callable(progress):
        tick = progress
        into(*stream, lambda _: tick(1), copy)
        return model
    with ByteBar("loading weights", progress=progress, main=_is_main(progress, env)) as bar:
        bar.grow(reader.nbytes())
        into(*stream, bar.update, copy)
    return model


def _is_main(progress: bool | None, env: Env | None) -> bool:
    """Whether this is the main rank, asking `detect` only when a bar would show at all."""
    if env is not None:
        return env.is_main
    return is_shown(progress, main=True) and detect(hardware=Hardware()).is_main


def _stream_into(model: Any, reader: CheckpointReader, expected: Mapping[str, Any],
                 groups: Mapping[str, tuple[str, ...]], dmap: DeviceMap | None, dtype: Any,
                 keep: Sequence[str], folder: str | os.PathLike[str] | None,
                 done: Callable[[int], Any], copy: bool) -> None:
    """Put each streamed tensor in place; ``done(nbytes)`` after each one."""
    import torch

    offloaded: dict[str, OffloadSource] = dict(getattr(model, OFFLOAD_ATTR, None) or {})
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, view, src in reader.stream():
        if name in expected:
            names = groups.get(name, (name,))
            current = expected[name]
            target = _target_dtype(name, current.dtype, view.dtype, dtype, keep)
            device = dmap.device_of(name) if dmap is not None else None
            if device == "disk" and name in params:
                source = offload_tensor(name, view, src, target, folder)
                if src is not None and source is not src:
                    reader.release(src)
                offloaded.update(dict.fromkeys(names, source))
                _place(model, names, torch.empty(view.shape, dtype=target, device="meta"))
            else:
                if device is None or device == "disk":
                    where = "cpu" if current.is_meta else current.device
                else:
                    where = _torch_device(device)
                if src is not None and not copy and str(where) == "cpu" and view.dtype == target:
                    value = view  # backed by the file's pages (copy-on-write), not copied
                else:
                    value = view.to(device=where, dtype=target, copy=True)
                    if src is not None:
                        reader.release(src)
                _place(model, names, value)
                for alias in names:
                    offloaded.pop(alias, None)
        done(view.numel() * view.element_size())
    object.__setattr__(model, OFFLOAD_ATTR, offloaded)
    if folder is not None and offloaded:
        write_offload_index(folder, offloaded)
