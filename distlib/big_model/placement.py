"""Putting a loaded model on its devices: `dispatch` and `load_checkpoint_and_dispatch`.

`dispatch` moves each resident tensor to its device, records the offloaded ones (kept in RAM
next to a GPU, or on disk) as slots, and hooks the model (`distlib.big_model.hooks`) so that a
forward brings them and the inputs where each entry runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from distlib.big_model.device_map import (
    MODES,
    DeviceMap,
    check_devices_exist,
    check_switch,
    infer_device_map,
    visible_devices,
)
from distlib.big_model.files import OffloadSource
from distlib.big_model.hooks import HookState, Slot, attach_hooks, remove_hooks, torch_device
from distlib.big_model.loading import load_checkpoint
from distlib.big_model.offload import (
    OFFLOAD_ATTR,
    offload_tensor,
    open_source,
    read_offload_index,
    write_offload_index,
)
from distlib.errors import DeviceMapError

if TYPE_CHECKING:
    from distlib.env import Env

__all__ = ["dispatch", "load_checkpoint_and_dispatch"]


def _check_covered(model: Any, dmap: DeviceMap) -> None:
    missing = [n for n, _ in model.named_parameters(remove_duplicate=False)
               if dmap.device_of(n) is None]
    if missing:
        msg = (f"dispatch(): device_map must give a device to every parameter, but got none "
               f"for {missing[:10]}{' ...' if len(missing) > 10 else ''}. Add their modules (or "
               "a parent, or '') to the map.")
        raise DeviceMapError(msg)


def _tensors(model: Any) -> list[tuple[str, Any, str, bool]]:
    out = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for kind, store in ((True, module._parameters), (False, module._buffers)):
            for leaf, tensor in store.items():
                if tensor is not None:
                    out.append((f"{prefix}.{leaf}" if prefix else leaf, module, leaf, kind))
    return out


def _is_offloaded(device: Any, run_on: Any, module: Any, leaf: str, is_param: bool,
                  offload_buffers: bool) -> bool:
    """Whether a tensor stays at home (RAM, or disk) between forwards, as in Accelerate.

    Weights of ``"disk"`` entries, and of ``"cpu"`` entries when an accelerator executes,
    are offloaded. Buffers stay resident on the execution device unless ``offload_buffers``;
    then the persistent ones go with their module's weights, and the non-persistent ones
    (no checkpoint holds them, and a forward may replace them, as a rotary cache does) stay
    resident.
    """
    away = bool(device == "disk" or (device == "cpu" and run_on.type != "cpu"))
    if is_param or not away:
        return away
    non_persistent: set[str] = getattr(module, "_non_persistent_buffers_set", set())
    return offload_buffers and leaf not in non_persistent


def _disk_source(name: str, tensor: Any, is_param: bool,
                 offload_folder: str | os.PathLike[str] | None) -> OffloadSource:
    """Write a real tensor mapped to ``"disk"`` (with no offloaded copy yet) to the folder."""
    if tensor.is_meta:
        kind = "weight" if is_param else "buffer"
        msg = (f"dispatch(): a {kind} mapped to 'disk' must have been loaded by "
               f"load_checkpoint (or be real), but {name!r} is on the meta device with "
               "no offloaded copy. Load the checkpoint with the same device_map first.")
        raise DeviceMapError(msg)
    if offload_folder is None and not is_param:
        msg = (f"dispatch(): offload_folder must be given when offload_buffers=True sends the "
               f"buffers of 'disk' modules to disk (they are written there), but got None for "
               f"{name!r}. Pass offload_folder='offload' (any writable folder), or "
               "offload_buffers=False to keep buffers on the execution device.")
        raise DeviceMapError(msg)
    return offload_tensor(name, tensor.detach(), None, tensor.dtype, offload_folder)


def _plan_slots(model: Any, dmap: DeviceMap, main: Any, sources: Mapping[str, OffloadSource],
                offload_folder: str | os.PathLike[str] | None, offload_buffers: bool,
                state: HookState) -> dict[str, OffloadSource]:
    """Move resident tensors to their devices; record the offloaded ones as slots.

    Returns the disk copies written for tensors that were real (not loaded for this map). A
    tensor at rest on the meta device that an earlier dispatch left on disk, now mapped to
    stay resident, is read back from its offloaded copy.
    """
    import torch

    written: dict[str, OffloadSource] = {}

    homes: dict[int, Any] = {}  # one home per shared tensor, so ties survive
    pin = main.type == "cuda"
    for name, module, leaf, is_param in _tensors(model):
        store = module._parameters if is_param else module._buffers
        tensor = store[leaf]
        device = dmap.device_of(name)
        owner = name.rpartition(".")[0]
        run_on = torch_device(device) if device not in (None, "cpu", "disk") else main
        state.devices.setdefault(owner, run_on)
        if not _is_offloaded(device, run_on, module, leaf, is_param, offload_buffers):
            if id(tensor) not in homes:
                if tensor.is_meta and name in sources:  # on disk since an earlier dispatch
                    moved = open_source(sources[name], {}).to(run_on, copy=True)
                else:
                    moved = tensor.detach().to(run_on) if tensor.device != run_on else tensor
                homes[id(tensor)] = torch.nn.Parameter(moved, tensor.requires_grad) \
                    if is_param and moved is not tensor else moved
            store[leaf] = homes[id(tensor)]
            continue
        source = sources.get(name) if device == "disk" else None
        if device == "disk" and source is None:
            source = written[name] = _disk_source(name, tensor, is_param, offload_folder)
        if id(tensor) not in homes:
            if source is not None:
                home = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            else:
                home = tensor.detach().to("cpu")
                home = home.pin_memory() if pin else home
            homes[id(tensor)] = torch.nn.Parameter(home, tensor.requires_grad) if is_param else home
        store[leaf] = homes[id(tensor)]
        state.slots.setdefault(owner, []).append(
            Slot(module=module, leaf=leaf, parameter=is_param, home=homes[id(tensor)],
                  source=source))
    return written


def dispatch(model: Any, device_map: DeviceMap | Mapping[str, Any],
             offload_folder: str | os.PathLike[str] | None = None,
             offload_buffers: bool = False) -> Any:
    """Place ``model`` on the devices of ``device_map`` and hook it to run across them.

    Entries on a GPU (or, with no GPU in the map, on ``"cpu"``) are moved there. Entries on
    ``"cpu"`` next to a GPU, and on ``"disk"``, keep their weights at home (RAM, or a memory
    map of safetensors bytes) and run on the first GPU of the map (the CPU when there is
    none): a forward pre-hook brings the weights and the inputs there just in time and a
    forward hook sends the weights home. Tied weights stay one tensor. Buffers of those
    entries stay resident on the execution device unless ``offload_buffers`` (Accelerate's
    rule): then their persistent buffers stay at home with the weights (RAM for ``"cpu"``,
    the offload folder for ``"disk"``) and only the non-persistent ones stay resident. The
    map is kept as ``model.hf_device_map``.

    Args:
        model: a model loaded by `load_checkpoint` with the same map (or a real model).
        device_map: a `DeviceMap` or ``{name: device}``.
        offload_folder: where disk weights not already recorded on the model are (or are
            written, for a real model, and for buffers with ``offload_buffers``).
        offload_buffers: offload the persistent buffers of offloaded entries with their
            weights (``True`` or ``False``).

    Returns:
        ``model``, modified in place.

    Raises:
        DeviceMapError: the map leaves parameters without a device, names a GPU (or MPS)
            this machine does not have, a disk weight has no source, ``offload_buffers`` is
            not a bool, or it sends buffers to disk with no ``offload_folder``.
        CheckpointError: ``offload_folder``'s ``index.json`` is not JSON, or an entry names a
            file, dtype or byte range no weight can have (it is never unpickled).

    Effects: moves tensors between devices; registers forward hooks (removing those of an
    earlier dispatch); may write ``offload_folder``; sets ``model.hf_device_map``.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> dispatch(net, {"": "cpu"}).hf_device_map
        {'': 'cpu'}
    """
    import torch

    check_switch(offload_buffers, "offload_buffers", source="dispatch()")
    dmap = DeviceMap.of(device_map)
    _check_covered(model, dmap)
    check_devices_exist(dmap, *visible_devices(), source="dispatch()")
    remove_hooks(model)
    gpus = [d for d in dmap.devices if d not in ("cpu", "disk")]
    main = torch_device(gpus[0]) if gpus else torch.device("cpu")
    sources = dict(getattr(model, OFFLOAD_ATTR, None) or {})
    if not sources and offload_folder is not None:
        sources = read_offload_index(offload_folder)
    state = HookState()
    written = _plan_slots(model, dmap, main, sources, offload_folder, offload_buffers, state)
    if written:
        sources.update(written)
        object.__setattr__(model, OFFLOAD_ATTR, sources)
        if offload_folder is not None:
            write_offload_index(offload_folder, sources)
    attach_hooks(model, dmap, main, state)
    object.__setattr__(model, "hf_device_map", dmap.as_dict())
    return model


def load_checkpoint_and_dispatch(
        model: Any, checkpoint: str | os.PathLike[str],
        device_map: DeviceMap | Mapping[str, Any] | str | None = "auto",
        max_memory: Mapping[Any, Any] | None = None,
        no_split_module_classes: Sequence[str] | None = None,
        offload_folder: str | os.PathLike[str] | None = None, dtype: Any = None, *,
        offload_buffers: bool = False, fallback_allocation: bool = False,
        keep_in_fp32_modules: Sequence[str] | None = None,
        strict: bool = True, env: Env | None = None, quiet: bool = False,
        progress: bool | None = None) -> Any:
    """Plan (when asked), load ``checkpoint`` into ``model`` and `dispatch` it, in one call.

    Args:
        model: the module to fill, usually built under `init_empty_weights`.
        checkpoint: a file, an index ``.json`` or a folder (see `load_checkpoint`).
        device_map: a map, or ``"auto"``/``"balanced"``/``"balanced_low_0"``/``"sequential"`` to
            plan one with `infer_device_map`; ``None`` loads without dispatching.
        max_memory: budgets for the planner (``None``: ask the hardware).
        no_split_module_classes: classes kept whole by the planner (default: the model's
            ``_no_split_modules`` when it has them).
        offload_folder: where converted disk weights are written.
        dtype: the dtype to load floating weights in.
        offload_buffers: offload the persistent buffers of ``"cpu"``/``"disk"`` entries with
            their weights (see `dispatch`; disk buffers need ``offload_folder``); when
            planning, ``False`` warns if those buffers fit in no GPU's remaining budget.
        fallback_allocation: when planning, give a device the walk would leave empty a
            smaller module from further on (see `infer_device_map`).
        keep_in_fp32_modules: modules kept in float32 (default: ``_keep_in_fp32_modules``).
        strict: refuse unexpected keys too.
        env: an `Env`; the progress bar shows on its main rank only (``None``: the launch
            variables say which rank this is).
        quiet: no progress bar (as ``progress=False``).
        progress: a bar in bytes on stderr, one update per tensor (see `load_checkpoint`):
            True always, False never, None (the default) when stderr is a terminal and the
            load has lasted 2 seconds.

    Returns:
        ``model``, loaded and dispatched (``model.hf_device_map`` holds the map).

    Raises:
        DeviceMapError: the model cannot be planned or dispatched as asked (a map or a
            ``max_memory`` naming a GPU this machine does not have included), or a switch
            is not a bool.
        CheckpointError: the checkpoint is unreadable, unsafe or does not match.

    Effects: as `load_checkpoint` then `dispatch`; the main rank may print a progress bar to
    stderr.

    Examples:
        >>> import os, tempfile, torch
        >>> from safetensors.torch import save_file
        >>> from distlib.big_model.empty import init_empty_weights
        >>> folder = tempfile.mkdtemp()
        >>> save_file({"0.weight": torch.eye(2), "0.bias": torch.zeros(2)},
        ...           os.path.join(folder, "model.safetensors"))
        >>> with init_empty_weights():
        ...     net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> net = load_checkpoint_and_dispatch(net, folder, {"": "cpu"}, quiet=True)
        >>> net(torch.ones(1, 2)).tolist()
        [[1.0, 1.0]]
    """
    source = "load_checkpoint_and_dispatch()"
    check_switch(offload_buffers, "offload_buffers", source=source)
    check_switch(fallback_allocation, "fallback_allocation", source=source)
    if fallback_allocation and not isinstance(device_map, str):
        msg = (f"{source}: fallback_allocation=True must come with a device_map to plan "
               f"(one of {', '.join(map(repr, MODES))}), but got device_map="
               f"{'a map' if device_map is not None else 'None'}, which nothing plans, so the "
               "option could not be honoured. Drop fallback_allocation, or pass "
               "device_map='auto'.")
        raise DeviceMapError(msg)
    if no_split_module_classes is None:
        no_split_module_classes = tuple(getattr(model, "_no_split_modules", None) or ())
    if isinstance(device_map, str):
        device_map = infer_device_map(model, max_memory, no_split_module_classes, dtype,
                                      mode=device_map, keep_in_fp32_modules=keep_in_fp32_modules,
                                      offload_buffers=offload_buffers,
                                      fallback_allocation=fallback_allocation)
    if device_map is not None:  # before reading a byte: the planner's map too (explicit budgets)
        check_devices_exist(DeviceMap.of(device_map), *visible_devices(), source=source)
    load_checkpoint(model, checkpoint, device_map, dtype, offload_folder,
                    keep_in_fp32_modules=keep_in_fp32_modules, strict=strict,
                    progress=False if quiet else progress, env=env)
    if device_map is None:
        return model
    return dispatch(model, device_map, offload_folder, offload_buffers)
