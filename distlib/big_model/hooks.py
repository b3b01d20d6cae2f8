"""Putting a loaded model on its devices and running it there: `dispatch` and friends.

Each entry of the device map gets a forward pre-hook (``register_forward_pre_hook``) that
moves the inputs to the entry's execution device and brings offloaded weights there just in
time, and a forward hook that sends them home afterwards; ``forward`` itself is never
replaced. Weights mapped to ``"cpu"`` stay in RAM when a GPU executes; weights mapped to
``"disk"`` stay in safetensors files (read into a reused buffer when the CPU executes, copied
from a memory map when a GPU does). While one entry computes, the next offloaded entry is
fetched ahead: a side CUDA stream on GPUs, ``posix_fadvise(WILLNEED)`` read-ahead on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from distlib.big_model.files import (
    OFFLOAD_ATTR,
    OffloadSource,
    _offload,
    drop_pages,
    load_checkpoint,
    open_source,
    read_offload_index,
    write_offload_index,
)
from distlib.big_model.device_map import (
    Device,
    DeviceMap,
    check_devices_exist,
    infer_device_map,
    visible_devices,
)
from distlib.errors import DeviceMapError

__all__ = ["dispatch", "load_checkpoint_and_dispatch"]


@dataclass(slots=True)
class _Slot:
    """One tensor slot of a module that is brought to the execution device for a forward."""

    module: Any
    leaf: str
    parameter: bool
    home: Any  # the at-rest tensor (a cpu tensor, or a meta tensor for disk)
    source: OffloadSource | None = None


@dataclass(slots=True)
class _Runtime:
    """What the hooks of one dispatched model share (never module-level state)."""

    maps: dict[str, Any] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    slots: dict[str, list[_Slot]] = field(default_factory=dict)
    devices: dict[str, Any] = field(default_factory=dict)
    stream: Any = None
    ahead: tuple[str, Any, list[Any]] | None = None
    output_device: Any = None
    trace: list[str] | None = field(default_factory=list)  # run order, until learned
    arenas: list[Any] = field(default_factory=list)  # free byte buffers for disk weights
    arena_bytes: int = 0
    in_use: dict[str, Any] = field(default_factory=dict)  # module -> arena while it runs


_ALIGN = 64


def _spans(slots: list[_Slot]) -> tuple[list[int], int]:
    """Offsets of each disk weight in a module's arena (64-byte aligned), and the total."""
    offsets, total = [], 0
    for slot in slots:
        offsets.append(total)
        nbytes = slot.source.nbytes if slot.source is not None else 0
        total += -(-nbytes // _ALIGN) * _ALIGN
    return offsets, total


def _read_into(handle: Any, src: OffloadSource, out: Any) -> None:
    """Read ``src``'s bytes into the uint8 tensor ``out`` (no page faults on a mapping)."""
    view, done = memoryview(out.numpy()).cast("B"), 0
    while done < src.nbytes:
        handle.seek(src.offset + done)
        count = handle.readinto(view[done:])
        if not count:
            msg = (f"dispatch(): {src.file} must hold the bytes of an offloaded weight, but it "
                   "ended early. Was the checkpoint or offload folder changed after loading?")
            raise DeviceMapError(msg)
        done += count


def _fetch_cpu(runtime: _Runtime, key: str, slots: list[_Slot]) -> list[Any]:
    """Read a CPU-run module's disk weights into a reused arena: copies, not page faults."""
    import torch

    offsets, total = _spans(slots)
    arena = runtime.arenas.pop() if runtime.arenas else None
    if arena is None or arena.numel() < total:
        arena = torch.empty(max(total, runtime.arena_bytes), dtype=torch.uint8)
    runtime.in_use[key] = arena
    values: list[Any] = []
    handles: dict[str, Any] = {}
    try:
        for slot, offset in zip(slots, offsets, strict=True):
            src = slot.source
            if src is None:  # not offloaded to disk: nothing to read
                values.append(slot.home)
                continue
            chunk = arena[offset:offset + src.nbytes]
            if src.nbytes:
                if src.file not in handles:
                    handles[src.file] = open(src.file, "rb", buffering=0)  # noqa: SIM115
                _read_into(handles[src.file], src, chunk)
            values.append(chunk.view(getattr(torch, src.dtype)).view(src.shape))
    finally:
        for handle in handles.values():
            handle.close()
    return values


def _move(obj: Any, device: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, (list, tuple)):
        moved = [_move(o, device) for o in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    if isinstance(obj, Mapping):
        moved_map = {k: _move(v, device) for k, v in obj.items()}
        try:
            return type(obj)(moved_map)  # type: ignore[call-arg]
        except TypeError:
            return moved_map
    return obj


def _fetch(slot: _Slot, device: Any, runtime: _Runtime, non_blocking: bool = False) -> Any:
    if slot.source is not None:
        view = open_source(slot.source, runtime.maps)
        return view if device.type == "cpu" else view.to(device, non_blocking=non_blocking)
    return slot.home.detach().to(device, non_blocking=non_blocking)


def _install(slot: _Slot, value: Any) -> None:
    import torch

    if slot.parameter:
        slot.module._parameters[slot.leaf] = torch.nn.Parameter(
            value, requires_grad=slot.home.requires_grad and value.is_floating_point())
    else:
        slot.module._buffers[slot.leaf] = value


def _restore(slot: _Slot) -> None:
    if slot.parameter:
        slot.module._parameters[slot.leaf] = slot.home
    else:
        slot.module._buffers[slot.leaf] = slot.home


def _read_ahead(runtime: _Runtime, key: str) -> None:
    """Start fetching ``key``'s weights: a side stream on CUDA, page read-ahead on the CPU."""
    device = runtime.devices[key]
    slots = runtime.slots[key]
    if device.type == "cuda" and runtime.stream is not None:
        import torch

        with torch.cuda.stream(runtime.stream):
            values = [_fetch(s, device, runtime, non_blocking=True) for s in slots]
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(runtime.stream)
        runtime.ahead = (key, event, values)
        return
    advise = getattr(os, "posix_fadvise", None)
    for slot in slots:
        src = slot.source
        if src is None or advise is None or src.nbytes == 0:
            continue
        with open(src.file, "rb", buffering=0) as handle:  # the advice outlives the handle
            advise(handle.fileno(), src.offset, src.nbytes, os.POSIX_FADV_WILLNEED)


def _release(runtime: _Runtime, src: OffloadSource) -> None:
    """Unmap a disk weight's pages once its module has run: they stay in the page cache, but
    no longer count in this process's resident memory."""
    drop_pages(runtime.maps.get(src.file), src)


def _following(runtime: _Runtime, key: str) -> str | None:
    """The offloaded module expected to run after ``key``."""
    try:
        position = runtime.order.index(key)
    except ValueError:
        return None
    return runtime.order[position + 1] if position + 1 < len(runtime.order) else None


def _learn_order(runtime: _Runtime) -> None:
    """After the first forward, prefetch in the order modules really ran (not defined)."""
    if runtime.trace:
        ran = [k for k in dict.fromkeys(runtime.trace) if runtime.slots.get(k)]
        if set(ran) == set(runtime.order):
            runtime.order = ran
            runtime.trace = None
            return
    runtime.trace = []


def _make_hooks(key: str, runtime: _Runtime, root: bool) -> tuple[Any, Any]:
    device = runtime.devices.get(key)
    slots = runtime.slots.get(key, [])

    def pre_hook(module: Any, args: Any, kwargs: Any) -> Any:
        if root:
            first = next((a for a in [*args, *kwargs.values()] if hasattr(a, "device")), None)
            runtime.output_device = None if first is None else first.device
        if runtime.trace is not None:
            runtime.trace.append(key)
        if slots:
            ahead, runtime.ahead = runtime.ahead, None
            if ahead is not None and ahead[0] == key:
                import torch

                torch.cuda.current_stream(device).wait_event(ahead[1])
                for value in ahead[2]:
                    value.record_stream(torch.cuda.current_stream(device))
                values = ahead[2]
            elif device is not None and device.type == "cpu":
                values = _fetch_cpu(runtime, key, slots)
            else:
                values = [_fetch(s, device, runtime) for s in slots]
            for slot, value in zip(slots, values, strict=True):
                _install(slot, value)
            following = _following(runtime, key)
            if following is not None:
                _read_ahead(runtime, following)
        if device is None:
            return args, kwargs
        return _move(args, device), _move(kwargs, device)

    def post_hook(module: Any, args: Any, output: Any) -> Any:
        for slot in slots:
            _restore(slot)
            if slot.source is not None and key not in runtime.in_use:
                _release(runtime, slot.source)
        if key in runtime.in_use:
            runtime.arenas.append(runtime.in_use.pop(key))
        if root and runtime.trace is not None:
            _learn_order(runtime)
        if root and runtime.output_device is not None and \
                any(d != runtime.output_device for d in runtime.devices.values()):
            return _move(output, runtime.output_device)
        return output

    return pre_hook, post_hook


_HANDLES = "_distlib_hook_handles"


def _torch_device(device: Device) -> Any:
    import torch

    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def _movers(dmap: DeviceMap, modules: Mapping[str, Any], main: Any) -> dict[str, Any]:
    """The modules that move inputs for each map entry, with their execution devices.

    A tensor entry is served by its module; a container without ``forward`` (ModuleList,
    ModuleDict) by its children, recursively.
    """
    import torch

    out: dict[str, Any] = {}
    for key, device in dmap.entries:
        run_on = _torch_device(device) if device not in ("cpu", "disk") else main
        stack = [key if key in modules else key.rpartition(".")[0]]
        while stack:
            name = stack.pop()
            module = modules[name]
            if type(module).forward is torch.nn.Module.forward:
                prefix = f"{name}." if name else ""
                stack.extend(reversed([prefix + c for c, _ in module.named_children()]))
            else:
                out.setdefault(name, run_on)
    return out


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


def _plan_slots(model: Any, dmap: DeviceMap, main: Any, sources: Mapping[str, OffloadSource],
                offload_folder: str | os.PathLike[str] | None, offload_buffers: bool,
                runtime: _Runtime) -> dict[str, OffloadSource]:
    """Move resident tensors to their devices; record the offloaded ones as slots.

    Returns the disk copies written for weights that were real (not loaded for this map).
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
        run_on = _torch_device(device) if device not in (None, "cpu", "disk") else main
        runtime.devices.setdefault(owner, run_on)
        offloaded = (device == "disk" and is_param) or (
            device in ("cpu", "disk") and run_on.type != "cpu" and (is_param or offload_buffers))
        if not offloaded:
            if id(tensor) not in homes:
                moved = tensor.detach().to(run_on) if tensor.device != run_on else tensor
                homes[id(tensor)] = torch.nn.Parameter(moved, tensor.requires_grad) \
                    if is_param and moved is not tensor else moved
            store[leaf] = homes[id(tensor)]
            continue
        source = sources.get(name) if device == "disk" and is_param else None
        if device == "disk" and is_param and source is None:
            if tensor.is_meta:
                msg = (f"dispatch(): a weight mapped to 'disk' must have been loaded by "
                       f"load_checkpoint (or be real), but {name!r} is on the meta device with "
                       "no offloaded copy. Load the checkpoint with the same device_map first.")
                raise DeviceMapError(msg)
            source = _offload(name, tensor.detach(), None, tensor.dtype, offload_folder)
            written[name] = source
        if id(tensor) not in homes:
            if source is not None:
                home = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            else:
                home = tensor.detach().to("cpu")
                home = home.pin_memory() if pin else home
            homes[id(tensor)] = torch.nn.Parameter(home, tensor.requires_grad) if is_param else home
        store[leaf] = homes[id(tensor)]
        runtime.slots.setdefault(owner, []).append(
            _Slot(module=module, leaf=leaf, parameter=is_param, home=homes[id(tensor)],
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
    forward hook sends the weights home. Tied weights stay one tensor. Buffers stay resident
    on the execution device unless ``offload_buffers``. The map is kept as
    ``model.hf_device_map``.

    Args:
        model: a model loaded by `load_checkpoint` with the same map (or a real model).
        device_map: a `DeviceMap` or ``{name: device}``.
        offload_folder: where disk weights not already recorded on the model are (or are
            written, for a real model).
        offload_buffers: offload buffers with their module's weights too.

    Returns:
        ``model``, modified in place.

    Raises:
        DeviceMapError: the map leaves parameters without a device, names a GPU (or MPS)
            this machine does not have, or a disk weight has no source.
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

    dmap = DeviceMap.of(device_map)
    _check_covered(model, dmap)
    check_devices_exist(dmap, *visible_devices(), source="dispatch()")
    for handle in getattr(model, _HANDLES, ()):
        handle.remove()
    gpus = [d for d in dmap.devices if d not in ("cpu", "disk")]
    main = _torch_device(gpus[0]) if gpus else torch.device("cpu")
    sources = dict(getattr(model, OFFLOAD_ATTR, None) or {})
    if not sources and offload_folder is not None:
        sources = read_offload_index(offload_folder)
    runtime = _Runtime()
    written = _plan_slots(model, dmap, main, sources, offload_folder, offload_buffers, runtime)
    if written:
        sources.update(written)
        object.__setattr__(model, OFFLOAD_ATTR, sources)
        if offload_folder is not None:
            write_offload_index(offload_folder, sources)
    modules = dict(model.named_modules(remove_duplicate=False))
    movers = _movers(dmap, modules, main)
    runtime.devices.update(movers)
    runtime.order = [n for n in modules if runtime.slots.get(n)]
    runtime.arena_bytes = max((_spans(v)[1] for v in runtime.slots.values()), default=0)
    if main.type == "cuda" and runtime.order:
        runtime.stream = torch.cuda.Stream(main)  # type: ignore[no-untyped-call]
    hooked = list(dict.fromkeys([*movers, *runtime.order])) if len(dmap.devices) > 1 or \
        runtime.order else []
    if hooked and "" not in hooked:
        hooked.insert(0, "")
    handles = []
    for name in hooked:
        pre, post = _make_hooks(name, runtime, root=name == "")
        handles.append(modules[name].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(modules[name].register_forward_hook(post))
    object.__setattr__(model, _HANDLES, handles)
    object.__setattr__(model, "hf_device_map", dmap.as_dict())
    return model


def load_checkpoint_and_dispatch(
        model: Any, checkpoint: str | os.PathLike[str],
        device_map: DeviceMap | Mapping[str, Any] | str | None = "auto",
        max_memory: Mapping[Any, Any] | None = None,
        no_split_module_classes: Sequence[str] | None = None,
        offload_folder: str | os.PathLike[str] | None = None, dtype: Any = None, *,
        offload_buffers: bool = False, keep_in_fp32_modules: Sequence[str] | None = None,
        strict: bool = True, env: Any = None, quiet: bool = False) -> Any:
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
        offload_buffers: offload buffers with their modules' weights.
        keep_in_fp32_modules: modules kept in float32 (default: ``_keep_in_fp32_modules``).
        strict: refuse unexpected keys too.
        env: an `Env`; the progress bar shows on its main rank only.
        quiet: no progress bar.

    Returns:
        ``model``, loaded and dispatched (``model.hf_device_map`` holds the map).

    Raises:
        DeviceMapError: the model cannot be planned or dispatched as asked (a map or a
            ``max_memory`` naming a GPU this machine does not have included).
        CheckpointError: the checkpoint is unreadable, unsafe or does not match.

    Effects: as `load_checkpoint` then `dispatch`; prints a progress bar to stderr.

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
    if no_split_module_classes is None:
        no_split_module_classes = tuple(getattr(model, "_no_split_modules", None) or ())
    if isinstance(device_map, str):
        device_map = infer_device_map(model, max_memory, no_split_module_classes, dtype,
                                      mode=device_map, keep_in_fp32_modules=keep_in_fp32_modules)
    if device_map is not None:  # before reading a byte: the planner's map too (explicit budgets)
        check_devices_exist(DeviceMap.of(device_map), *visible_devices(),
                            source="load_checkpoint_and_dispatch()")
    from distlib.big_model.files import checkpoint_tensors

    total = len(checkpoint_tensors(checkpoint))
    show = not quiet and (env is None or getattr(env, "is_main", True))
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="loading weights", unit="tensor", disable=not show) as bar:
        load_checkpoint(model, checkpoint, device_map, dtype, offload_folder,
                        keep_in_fp32_modules=keep_in_fp32_modules, strict=strict,
                        progress=bar.update)
    if device_map is None:
        return model
    return dispatch(model, device_map, offload_folder, offload_buffers)
