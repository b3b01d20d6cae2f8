"""The forward hooks that run a dispatched model across its devices and the disk.

`distlib.big_model.placement` places the tensors and fills a `HookState`; `attach_hooks`
then gives each entry of the device map a forward pre-hook (``register_forward_pre_hook``) that
moves the inputs to the entry's execution device and brings offloaded weights there just in
time, and a forward hook that sends them home afterwards; ``forward`` itself is never
replaced. Weights mapped to ``"cpu"`` stay in RAM when a GPU executes; weights mapped to
``"disk"`` stay in safetensors files and are viewed through a memory map: the CPU computes
straight from the mapped pages (no copy) when the bytes are little-endian and aligned to their
dtype, else reads them into a reused buffer; a GPU copies them from the map. The mapped pages
are unmapped again once their module has run. While one entry computes, the next offloaded
entry is fetched ahead: a side CUDA stream on GPUs, ``posix_fadvise(WILLNEED)`` read-ahead
into the page cache on the CPU.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from distlib._tree import map_tree
from distlib.big_model.device_map import Device, DeviceMap
from distlib.big_model.files import DTYPE_ITEMSIZE, OffloadSource, drop_pages
from distlib.big_model.offload import open_source
from distlib.errors import DeviceMapError

__all__ = ["HookState", "Slot", "attach_hooks", "remove_hooks", "torch_device"]


@dataclass(slots=True)
class Slot:
    """One tensor slot of a module that is brought to the execution device for a forward."""

    module: Any
    leaf: str
    parameter: bool
    home: Any  # the at-rest tensor (a cpu tensor, or a meta tensor for disk)
    source: OffloadSource | None = None


@dataclass(slots=True)
class HookState:
    """What the hooks of one dispatched model share (never module-level state)."""

    maps: dict[str, Any] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    slots: dict[str, list[Slot]] = field(default_factory=dict)
    devices: dict[str, Any] = field(default_factory=dict)
    stream: Any = None
    ahead: tuple[str, Any, list[Any]] | None = None
    output_device: Any = None
    trace: list[str] | None = field(default_factory=list)  # run order, until learned
    arenas: list[Any] = field(default_factory=list)  # free byte buffers for disk weights
    arena_bytes: int = 0
    in_use: dict[str, Any] = field(default_factory=dict)  # module -> arena while it runs


_ALIGN = 64


def is_viewable(src: OffloadSource) -> bool:
    """Whether the CPU can compute straight from ``src``'s mapped bytes (no copy).

    Safetensors bytes are little-endian: they must be this machine's byte order, and start
    at a multiple of their item size (what kernels expect of a ``float*``); an empty tensor
    has nothing to map.

    Examples:
        >>> src = OffloadSource(file="w.safetensors", offset=88, nbytes=8, dtype="float32",
        ...                     shape=(2,))
        >>> is_viewable(src) == (sys.byteorder == "little")
        True
        >>> import dataclasses
        >>> is_viewable(dataclasses.replace(src, offset=90))
        False
    """
    return sys.byteorder == "little" and src.nbytes > 0 and \
        src.offset % DTYPE_ITEMSIZE[src.dtype] == 0


def _copied(slot: Slot) -> bool:
    """A disk weight that the CPU path reads into an arena (not viewed in place)."""
    return slot.source is not None and not is_viewable(slot.source)


def _spans(slots: list[Slot]) -> tuple[list[int], int]:
    """Offsets of each copied disk weight in a module's arena (64-byte aligned), and the total."""
    offsets, total = [], 0
    for slot in slots:
        offsets.append(total)
        nbytes = slot.source.nbytes if slot.source is not None and _copied(slot) else 0
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


def _fetch_cpu(state: HookState, key: str, slots: list[Slot]) -> list[Any]:
    """A CPU-run module's disk weights: views of the memory map where `is_viewable`, else
    read into a reused arena (64-byte aligned)."""
    import torch

    offsets, total = _spans(slots)
    arena = None
    if total:
        arena = state.arenas.pop() if state.arenas else None
        if arena is None or arena.numel() < total:
            arena = torch.empty(max(total, state.arena_bytes), dtype=torch.uint8)
        state.in_use[key] = arena
    values: list[Any] = []
    handles: dict[str, Any] = {}
    try:
        for slot, offset in zip(slots, offsets, strict=True):
            src = slot.source
            if src is None:  # not offloaded to disk: nothing to read
                values.append(slot.home)
                continue
            if arena is None or not _copied(slot):  # computed from the mapped pages
                values.append(open_source(src, state.maps))
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
    """``obj`` with its tensors on ``device`` (containers keep their type)."""
    return map_tree(lambda t: t if t.device == device else t.to(device), obj)


def _fetch(slot: Slot, device: Any, state: HookState, non_blocking: bool = False) -> Any:
    if slot.source is not None:
        view = open_source(slot.source, state.maps)
        return view if device.type == "cpu" else view.to(device, non_blocking=non_blocking)
    return slot.home.detach().to(device, non_blocking=non_blocking)


def _install(slot: Slot, value: Any) -> None:
    import torch

    if slot.parameter:
        slot.module._parameters[slot.leaf] = torch.nn.Parameter(
            value, requires_grad=slot.home.requires_grad and value.is_floating_point())
    else:
        slot.module._buffers[slot.leaf] = value


def _restore(slot: Slot) -> None:
    if slot.parameter:
        slot.module._parameters[slot.leaf] = slot.home
    else:
        slot.module._buffers[slot.leaf] = slot.home


def _read_ahead(state: HookState, key: str) -> None:
    """Start fetching ``key``'s weights: a side stream on CUDA, page read-ahead on the CPU."""
    device = state.devices[key]
    slots = state.slots[key]
    if device.type == "cuda" and state.stream is not None:
        import torch

        with torch.cuda.stream(state.stream):
            values = [_fetch(s, device, state, non_blocking=True) for s in slots]
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(state.stream)
        state.ahead = (key, event, values)
        return
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    ranges: dict[str, list[OffloadSource]] = {}
    for slot in slots:
        if slot.source is not None and slot.source.nbytes:
            ranges.setdefault(slot.source.file, []).append(slot.source)
    for file, sources in ranges.items():
        with open(file, "rb", buffering=0) as handle:  # the advice outlives the handle
            for src in sources:
                advise(handle.fileno(), src.offset, src.nbytes, os.POSIX_FADV_WILLNEED)


def _release(state: HookState, src: OffloadSource) -> None:
    """Unmap a disk weight's pages once its module has run: they stay in the page cache, but
    no longer count in this process's resident memory."""
    drop_pages(state.maps.get(src.file), src)


def _following(state: HookState, key: str) -> str | None:
    """The offloaded module expected to run after ``key``."""
    try:
        position = state.order.index(key)
    except ValueError:
        return None
    return state.order[position + 1] if position + 1 < len(state.order) else None


def _learn_order(state: HookState) -> None:
    """After the first forward, prefetch in the order modules really ran (not defined)."""
    if state.trace:
        ran = [k for k in dict.fromkeys(state.trace) if state.slots.get(k)]
        if set(ran) == set(state.order):
            state.order = ran
            state.trace = None
            return
    state.trace = []


def _make_hooks(key: str, state: HookState, root: bool) -> tuple[Any, Any]:
    device = state.devices.get(key)
    slots = state.slots.get(key, [])

    def pre_hook(module: Any, args: Any, kwargs: Any) -> Any:
        if root:
            first = next((a for a in [*args, *kwargs.values()] if hasattr(a, "device")), None)
            state.output_device = None if first is None else first.device
        if state.trace is not None:
            state.trace.append(key)
        if root and not slots and state.order and state.ahead is None:
            _read_ahead(state, state.order[0])  # the first offloaded module, ahead too
        if slots:
            ahead, state.ahead = state.ahead, None
            if ahead is not None and ahead[0] == key:
                import torch

                torch.cuda.current_stream(device).wait_event(ahead[1])
                for value in ahead[2]:
                    value.record_stream(torch.cuda.current_stream(device))
                values = ahead[2]
            elif device is not None and device.type == "cpu":
                values = _fetch_cpu(state, key, slots)
            else:
                values = [_fetch(s, device, state) for s in slots]
            for slot, value in zip(slots, values, strict=True):
                _install(slot, value)
            following = _following(state, key)
            if following is not None:
                _read_ahead(state, following)
        if device is None:
            return args, kwargs
        return _move(args, device), _move(kwargs, device)

    def post_hook(module: Any, args: Any, output: Any) -> Any:
        for slot in slots:
            _restore(slot)
            if slot.source is not None:
                _release(state, slot.source)
        if key in state.in_use:
            state.arenas.append(state.in_use.pop(key))
        if root and state.trace is not None:
            _learn_order(state)
        if root and state.output_device is not None and \
                any(d != state.output_device for d in state.devices.values()):
            return _move(output, state.output_device)
        return output

    return pre_hook, post_hook


_HANDLES = "_distlib_hook_handles"


def torch_device(device: Device) -> Any:
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
        run_on = torch_device(device) if device not in ("cpu", "disk") else main
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


def remove_hooks(model: Any) -> None:
    """Remove the hooks an earlier `attach_hooks` registered on ``model`` (if any).

    Effects: removes forward hooks of ``model``'s modules.
    """
    for handle in getattr(model, _HANDLES, ()):
        handle.remove()
    object.__setattr__(model, _HANDLES, [])


def attach_hooks(model: Any, dmap: DeviceMap, main: Any, state: HookState) -> None:
    """Hook the modules that move inputs to their device or bring offloaded weights in.

    Args:
        model: the dispatched model (its tensors already placed, ``state.slots`` filled).
        dmap: the device map.
        main: the execution device of entries kept on ``"cpu"`` or ``"disk"``.
        state: what the hooks share; its order, devices, arena size and stream are set here.

    Effects: registers a forward pre-hook and a forward hook on each hooked module (the root
    among them), kept on ``model`` for `remove_hooks`; may create a CUDA stream.
    """
    import torch

    modules = dict(model.named_modules(remove_duplicate=False))
    movers = _movers(dmap, modules, main)
    state.devices.update(movers)
    state.order = [n for n in modules if state.slots.get(n)]
    state.arena_bytes = max((_spans(v)[1] for v in state.slots.values()), default=0)
    if main.type == "cuda" and state.order:
        state.stream = torch.cuda.Stream(main)  # type: ignore[no-untyped-call]
    hooked = list(dict.fromkeys([*movers, *state.order])) if len(dmap.devices) > 1 or \
        state.order else []
    if hooked and "" not in hooked:
        hooked.insert(0, "")
    handles = []
    for name in hooked:
        pre, post = _make_hooks(name, state, root=name == "")
        handles.append(modules[name].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(modules[name].register_forward_hook(post))
    object.__setattr__(model, _HANDLES, handles)
