"""Where each part of a model goes: the `DeviceMap` value and the pure planner that builds it.

`infer_device_map` fills devices in order (GPUs by index, then ``mps``, ``cpu``, ``disk``),
taking modules whole when they fit, splitting them into their children when they do not
(unless their class is in ``no_split_module_classes``), keeping tied parameters together, and
keeping room on the first GPU and on the CPU for the largest layer that may be brought back
there. The rules are Accelerate's ``infer_auto_device_map`` (same maps for the same input),
its ``fallback_allocation`` (a device the walk would leave empty gets a smaller module from
further on) and its ``offload_buffers`` warning included; the implementation is written for
speed: linear in the number of modules in usual models.

With an explicit ``max_memory`` nothing here looks at the machine.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from distlib.big_model.sizes import (
    Layout,
    coerce_layout,
    keep_in_fp32_of,
    module_sizes,
    parse_size,
)
from distlib.errors import DeviceMapError

__all__ = ["MODES", "Device", "DeviceMap", "balanced_budgets", "check_devices_exist",
           "check_switch", "hardware_budgets", "infer_device_map", "normalize_budgets",
           "normalize_device", "plan_layout", "visible_devices"]

Device = int | str
MODES = ("sequential", "auto", "balanced", "balanced_low_0")
_NAMED = ("mps", "cpu", "disk")


def normalize_device(device: Any, *, source: str = "DeviceMap()") -> Device:
    """Return a device as the map writes it: GPU index ``int``, ``"mps"``, ``"cpu"``, ``"disk"``.

    Examples:
        >>> normalize_device("cuda:1"), normalize_device(0), normalize_device("cpu")
        (1, 0, 'cpu')
    """
    text = str(device)
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    if text in _NAMED:
        return text
    if text == "cuda":
        return 0
    if text.isdigit():
        return int(text)
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    msg = (f"{source}: a device must be a GPU index (0, 'cuda:0'), 'mps', 'cpu' or 'disk', "
           f"but got {device!r}.")
    raise DeviceMapError(msg)


def check_switch(value: Any, name: str, *, source: str) -> bool:
    """Return ``value`` if it is ``True`` or ``False``; refuse anything else (``1``, ``"yes"``).

    Raises:
        DeviceMapError: naming ``source``, the argument, the rule, the value and the fix.

    Examples:
        >>> check_switch(True, "offload_buffers", source="dispatch()")
        True
        >>> check_switch("no", "offload_buffers", source="dispatch()")
        Traceback (most recent call last):
        ...
        distlib.errors.DeviceMapError: dispatch(): offload_buffers must be True or False, but got 'no' (a str). ...
    """
    if isinstance(value, bool):
        return value
    msg = (f"{source}: {name} must be True or False, but got {value!r} (a "
           f"{type(value).__name__}). Pass {name}=True or {name}=False: a bool, not 1, "
           "'yes' or 'False'.")
    raise DeviceMapError(msg)


def _order(device: Device) -> tuple[int, int]:
    return (0, device) if isinstance(device, int) else (1, _NAMED.index(device))


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceMap:
    """Module (or parameter) name -> device, in model order; ``""`` names the whole model.

    Devices are GPU indices (``0``), ``"mps"``, ``"cpu"`` or ``"disk"`` (as in Accelerate's
    and transformers' ``hf_device_map``). ``usage`` holds the bytes the planner put on each
    device (empty for maps built by hand). A tensor's device is that of its longest named
    prefix.

    Examples:
        >>> dm = DeviceMap.of({"embed": 0, "layers": "cpu", "head": "disk"})
        >>> dm.device_of("layers.3.weight"), dm.devices
        ('cpu', (0, 'cpu', 'disk'))
    """

    entries: tuple[tuple[str, Device], ...]
    usage: tuple[tuple[Device, int], ...] = ()
    _index: dict[str, Device] = field(init=False, default_factory=dict, repr=False,
                                      compare=False)

    def __post_init__(self) -> None:
        index: dict[str, Device] = {}
        for name, device in self.entries:
            if not isinstance(name, str) or name in index:
                msg = (f"DeviceMap(): names must be distinct strings, but got {name!r} "
                       "twice or as a non-string.")
                raise DeviceMapError(msg)
            index[name] = normalize_device(device)
        object.__setattr__(self, "entries", tuple(index.items()))
        self._index.clear()
        self._index.update(index)

    @classmethod
    def of(cls, mapping: Mapping[str, Any] | DeviceMap) -> DeviceMap:
        """Build a map from a ``{name: device}`` mapping (or return a `DeviceMap` as is)."""
        if isinstance(mapping, DeviceMap):
            return mapping
        return cls(entries=tuple(mapping.items()))

    def as_dict(self) -> dict[str, Device]:
        """Return ``{name: device}`` (what transformers calls ``hf_device_map``)."""
        return dict(self.entries)

    @property
    def devices(self) -> tuple[Device, ...]:
        """The distinct devices used, GPUs first, then mps, cpu, disk."""
        return tuple(sorted({d for _, d in self.entries}, key=_order))

    def device_of(self, name: str) -> Device | None:
        """Return the device of the longest entry that is ``name`` or a prefix of it."""
        probe = name
        while True:
            if probe in self._index:
                return self._index[probe]
            if not probe:
                return None
            probe = probe.rpartition(".")[0]

    def key_of(self, name: str) -> str | None:
        """Return the entry (a name in the map) that decides where ``name`` goes."""
        probe = name
        while True:
            if probe in self._index:
                return probe
            if not probe:
                return None
            probe = probe.rpartition(".")[0]


def check_devices_exist(device_map: DeviceMap, num_gpus: int, mps: bool = False, *,
                        source: str) -> None:
    """Refuse a map that sends weights to a GPU (or MPS) the machine does not have.

    Args:
        device_map: the map about to be applied.
        num_gpus: how many GPUs this process sees (`visible_devices`, or made up in tests).
        mps: whether Apple's MPS device exists.
        source: the call, quoted first in the error.

    Raises:
        DeviceMapError: naming the entry, its device and the GPUs there are.

    Examples:
        >>> check_devices_exist(DeviceMap.of({"a": 1, "b": "cpu"}), 2, source="dispatch()")
        >>> check_devices_exist(DeviceMap.of({"a": "cuda:7"}), 2, source="dispatch()")
        Traceback (most recent call last):
        ...
        distlib.errors.DeviceMapError: dispatch(): device_map must name devices this machine has, but got 'cuda:7' for 'a', and it has 2 GPUs (cuda:0 to cuda:1). ...
    """
    gpus = num_gpus
    wrong = [(name, d) for name, d in device_map.entries
             if (isinstance(d, int) and d >= gpus) or (d == "mps" and not mps)]
    if not wrong:
        return
    name, device = wrong[0]
    shown = f"cuda:{device}" if isinstance(device, int) else device
    more = f" (and {len(wrong) - 1} more entries)" if len(wrong) > 1 else ""
    has = ("no GPU" if gpus == 0 else "1 GPU (cuda:0)" if gpus == 1
           else f"{gpus} GPUs (cuda:0 to cuda:{gpus - 1})") + ("" if mps or device != "mps"
                                                              else " and no MPS")
    msg = (f"{source}: device_map must name devices this machine has, but got {shown!r} for "
           f"{name!r}{more}, and it has {has}. Map those entries to an existing GPU, 'cpu' or "
           "'disk', or plan the map here with infer_device_map(model) (max_memory=None asks "
           "this machine); GPUs hidden by CUDA_VISIBLE_DEVICES do not count.")
    raise DeviceMapError(msg)


def normalize_budgets(max_memory: Mapping[Any, Any], *, source: str) -> dict[Device, int]:
    """Return ``{device: bytes}`` ordered GPUs, mps, cpu, disk; strings parsed.

    Examples:
        >>> normalize_budgets({"cpu": "1GB", "cuda:1": 10, 0: "1KiB"}, source="x")
        {0: 1024, 1: 10, 'cpu': 1000000000}
    """
    budgets: dict[Device, int] = {}
    for key, value in max_memory.items():
        device = normalize_device(key, source=f"{source}: max_memory")
        budgets[device] = parse_size(value, source=f"{source}: max_memory[{key!r}]")
    return {d: budgets[d] for d in sorted(budgets, key=_order)}


def visible_devices() -> tuple[int, bool]:
    """Return (the number of GPUs this process sees, whether MPS exists).

    Effects: imports torch; ``device_count`` does not initialise CUDA where NVML answers.
    """
    import torch

    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.device_count(), bool(mps is not None and mps.is_available())


def hardware_budgets() -> dict[Device, int]:
    """Ask the machine: free memory of each GPU, and 90% of the available RAM for ``cpu``.

    Effects: imports torch and psutil, initialises CUDA when GPUs are present.
    """
    import psutil
    import torch

    budgets: dict[Device, int] = {}
    for index in range(torch.cuda.device_count()):
        budgets[index] = int(torch.cuda.mem_get_info(index)[0])
    available = int(psutil.virtual_memory().available * 0.9)
    mps = getattr(torch.backends, "mps", None)
    budgets["mps" if mps is not None and mps.is_available() else "cpu"] = available
    return budgets


def _leaves(keys: Sequence[str]) -> list[str]:
    parents = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    return [k for k in keys if k and k not in parents]


def balanced_budgets(layout: Layout, sizes: Mapping[str, int], budgets: Mapping[Device, int],
                     no_split: frozenset[str], *, low_zero: bool = False,
                     from_hardware: bool = False) -> dict[Device, int]:
    """Lower the GPU budgets so a sequential fill spreads the model evenly over the GPUs.

    Each GPU but the last gets the model size over the GPU count, plus 1.25 times the larger
    of one no-split block and the mean leaf module; with ``low_zero`` GPU 0 gets only what
    the others cannot hold. Accelerate's ``get_balanced_memory`` rules.
    """
    result = dict(budgets)
    gpus = sorted(d for d, b in result.items() if isinstance(d, int) and b > 0)
    count = len(gpus) + (1 if result.get("mps", 0) > 0 else 0)
    if count == 0:
        return result
    if count == 1:
        low_zero = False
        if from_hardware and gpus:
            result[gpus[0]] = int(result[gpus[0]] * 0.9)
    total = sizes.get("", 0)
    per_gpu = total // (count - 1 if low_zero else count)
    block = 0
    if no_split:
        modules = layout.module_index()
        found: dict[str, int] = {}
        for name, size in sizes.items():
            info = modules.get(name) if name else None
            if info is not None and info.class_name in no_split:
                found.setdefault(info.class_name, size)
                if len(found) == len(no_split):
                    break
        block = max(found.values(), default=0)
    first = set(_leaves(list(sizes)))
    rest = [k for k in sizes if k not in first]
    leaves = _leaves(rest)
    mean = int(sum(sizes[k] for k in leaves) / max(len(leaves), 1))
    per_gpu += int(1.25 * max(block, mean))
    for index in gpus[:-1]:
        result[index] = min(result[0] if low_zero and index == 0 else per_gpu, result[index])
    if low_zero:
        others = sum(result.get(i, 0) for i in range(1, count))
        result[0] = min(max(0, total - others), result[0])
    return result


def infer_device_map(model: Any, max_memory: Mapping[Any, Any] | None = None,
                     no_split_module_classes: Sequence[str] | None = (), dtype: Any = None, *,
                     mode: str = "sequential",
                     keep_in_fp32_modules: Sequence[str] | None = None,
                     offload_buffers: bool = False,
                     fallback_allocation: bool = False) -> DeviceMap:
    """Plan where each module of ``model`` goes, GPUs first, then CPU, then disk.

    Args:
        model: a ``torch.nn.Module`` (the meta device is fine) or a `Layout`.
        max_memory: ``{device: budget}`` with devices ``0``/``"cuda:0"``, ``"mps"``, ``"cpu"``,
            ``"disk"`` and budgets in bytes or strings (``"10GiB"``, ``"500MB"``). Used exactly
            as given: a device not named gets nothing (``"disk"`` is unlimited unless named;
            ``"disk": 0`` forbids it). ``None`` asks the hardware.
        no_split_module_classes: class names of modules that must stay on one device
            (transformer blocks with residual connections).
        dtype: the dtype the weights will be loaded in (sizes shrink, never grow).
        mode: ``"sequential"`` fills GPU 0 first; ``"auto"``/``"balanced"`` spread the model over
            the GPUs; ``"balanced_low_0"`` keeps GPU 0 as empty as possible.
        keep_in_fp32_modules: module names counted as float32 whatever ``dtype`` is; default:
            the model's ``_keep_in_fp32_modules``.
        offload_buffers: whether `dispatch` will offload the buffers of ``"cpu"``/``"disk"``
            modules with their weights (pass it there too). The map is the same either way
            (buffers count in their module's size); with ``False`` a warning says when those
            buffers, kept on the executing GPU, fit in no GPU's remaining budget.
        fallback_allocation: when the next module fits nowhere on a device that is still
            empty, put the first smaller module further on there (found by splitting what
            can be split) instead of leaving the device empty; a device for which none is
            small enough gets nothing, with a warning.

    Returns:
        A `DeviceMap`, with whole subtrees on one device merged into one entry.

    Raises:
        DeviceMapError: a budget, device or switch is malformed, or the model cannot fit.

    Examples:
        >>> import torch
        >>> from distlib.big_model.empty import init_empty_weights
        >>> with init_empty_weights():
        ...     net = torch.nn.Sequential(*[torch.nn.Linear(100, 100) for _ in range(4)])
        >>> infer_device_map(net, {0: "90KB", "cpu": "1MB"}).as_dict()
        {'0': 0, '1': 'cpu', '2': 'cpu', '3': 'cpu'}
        >>> with init_empty_weights():  # two large layers, then a small one
        ...     net = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 100),
        ...                               torch.nn.Linear(100, 10))
        >>> infer_device_map(net, {0: "45KB", "cpu": "1MB"}).as_dict()
        {'': 'cpu'}
        >>> infer_device_map(net, {0: "45KB", "cpu": "1MB"}, fallback_allocation=True).as_dict()
        {'2': 0, '0': 'cpu', '1': 'cpu'}
    """
    source = "infer_device_map()"
    check_switch(offload_buffers, "offload_buffers", source=source)
    check_switch(fallback_allocation, "fallback_allocation", source=source)
    if mode not in MODES:
        msg = (f"infer_device_map(): mode must be one of {', '.join(map(repr, MODES))}, but got "
               f"{mode!r}.")
        raise DeviceMapError(msg)
    layout = coerce_layout(model)
    keep = keep_in_fp32_of(model, keep_in_fp32_modules)
    sizes = module_sizes(layout, dtype, keep)
    if isinstance(no_split_module_classes, str):
        no_split_module_classes = [no_split_module_classes]
    no_split = frozenset(no_split_module_classes or ())
    explicit = max_memory is not None
    budgets = normalize_budgets(hardware_budgets() if max_memory is None else max_memory,
                                source=source)
    if mode != "sequential":
        budgets = balanced_budgets(layout, sizes, budgets, no_split,
                                   low_zero=mode == "balanced_low_0", from_hardware=not explicit)
    buffers = None
    if not offload_buffers and any(isinstance(d, int) or d == "mps" for d in budgets):
        buffers = _buffer_sizes(layout, dtype, keep)
    planner = _Planner(layout, sizes, budgets, no_split, fallback=fallback_allocation,
                       buffer_sizes=buffers)
    plan = planner.run()
    for warning in planner.cautions():
        warnings.warn(warning, UserWarning, stacklevel=2)
    if explicit and "cpu" not in budgets and "disk" in plan.devices:
        warnings.warn(
            f"infer_device_map(): max_memory names no 'cpu' ({budgets}), so everything that does "
            "not fit on the GPUs goes to disk. Add a 'cpu' budget (e.g. max_memory={0: '20GiB', "
            "'cpu': '30GiB'}) to keep it in RAM.", UserWarning, stacklevel=2)
    return plan


def _buffer_sizes(layout: Layout, dtype: Any, keep: Sequence[str]) -> dict[str, int] | None:
    """Bytes of buffers under each module name (None when the model has no buffers)."""
    tensors = tuple(t for t in layout.tensors if t.buffer)
    if not tensors:
        return None
    return module_sizes(Layout(modules=layout.modules, tensors=tensors), dtype, keep)


class _Planner:
    """One run of the sequential fill; state lives here, never at module level."""

    def __init__(self, layout: Layout, sizes: Mapping[str, int],
                 budgets: Mapping[Device, int], no_split: frozenset[str], *,
                 fallback: bool = False, buffer_sizes: Mapping[str, int] | None = None) -> None:
        self.fallback, self.buffer_sizes = fallback, buffer_sizes
        self.offloaded_buffers = 0  # bytes of buffers under entries placed on cpu or disk
        self.missed: dict[Device, tuple[int, int]] = {}  # device left empty -> budget, reserve
        self.fallen: dict[Device, str] = {}  # device -> the last module its fallback chose
        self.modules = layout.module_index()
        self.sizes, self.no_split, self.tied = sizes, no_split, layout.tied
        self.budgets: dict[Device, int | None] = dict(budgets)
        self.budgets.setdefault("disk", None)
        self.devices = list(self.budgets)
        gpus = [d for d in self.devices if d not in ("cpu", "disk")]
        self.main = {"mps"} if "mps" in gpus else ({gpus[0], "cpu"} if gpus else {"cpu"})
        self.layer_max = self._layer_maxima(layout)
        root = self.modules[""]
        # the queue is a stack: its front is the end of the list
        self.queue = [*root.params, *root.children, *root.buffers][::-1]
        self.queued = set(self.queue)
        self.entries: dict[str, Device] = {}
        self.held = {d: 0 for d in self.devices}
        self.used = {d: 0 for d in self.devices}
        self.needed: dict[Device, int] = {}
        self.current = 0
        self.max_size, self.max_names = self._max_layers(self.queue, include_tensors=True)

    def _is_layer(self, name: str) -> bool:
        info = self.modules[name]
        return not info.children or info.class_name in self.no_split

    def _layer_maxima(self, layout: Layout) -> dict[str, int]:
        maxima: dict[str, int] = {}
        for info in reversed(layout.modules):
            if self._is_layer(info.name):
                maxima[info.name] = self.sizes.get(info.name, 0)
            else:
                maxima[info.name] = max(maxima[c] for c in info.children)
        return maxima

    def _max_layers(self, names: Sequence[str], include_tensors: bool = False) -> tuple[int, set[str]]:
        top = 0
        for name in names:
            if name in self.modules:
                top = max(top, self.layer_max[name])
            elif include_tensors:
                top = max(top, self.sizes.get(name, 0))
        found: set[str] = set()
        for name in names:
            if name not in self.modules:
                if include_tensors and self.sizes.get(name, 0) == top:
                    found.add(name)
            elif self.layer_max[name] == top:
                self._collect(name, top, found)
        return top, found

    def _collect(self, name: str, top: int, found: set[str]) -> None:
        stack = [name]
        while stack:
            current = stack.pop()
            if self._is_layer(current):
                if self.sizes.get(current, 0) == top:
                    found.add(current)
            else:
                stack.extend(c for c in self.modules[current].children
                             if self.layer_max[c] >= top)

    def _refresh(self) -> None:
        self.max_size, self.max_names = self._max_layers(
            [n for n in self.queue if n in self.modules])

    def _forget(self, name: str) -> None:
        """Drop ``name`` and the layers under it from the names realising the largest layer."""
        self.max_names.discard(name)
        if name in self.modules and not self._is_layer(name) and \
                self.layer_max[name] >= self.max_size and self.max_names:
            gone: set[str] = set()
            self._collect(name, self.max_size, gone)
            self.max_names -= gone
        if not self.max_names:
            self._refresh()

    def _splittable(self, name: str) -> bool:
        info = self.modules.get(name)
        return info is not None and bool(info.children) and info.class_name not in self.no_split

    def _parts(self, name: str) -> list[str]:
        info = self.modules[name]
        return [*info.params, *info.children]

    @staticmethod
    def _holder(tensor: str, among: set[str]) -> str | None:
        """The entry of ``among`` that holds ``tensor``: the tensor itself or a module above it."""
        probe = tensor
        while probe:
            if probe in among:
                return probe
            probe = probe.rpartition(".")[0]
        return None

    def _ties(self, name: str, among: set[str] | None = None) -> tuple[list[str], list[str]]:
        """Tensors tied to ``name``'s but outside it, and the entries (of the queue, or of
        ``among``) that hold them."""
        inside = name + "."
        outside: list[str] = []
        for group in self.tied:
            hits = [k == name or k.startswith(inside) for k in group]
            if any(hits) and not all(hits):
                outside += [k for k, hit in zip(group, hits, strict=True) if not hit]
        pool = self.queued if among is None else among
        holders = [h for h in (self._holder(t, pool) for t in outside) if h is not None]
        return outside, holders

    def _with_ties(self, name: str, holders: Sequence[str]) -> int:
        # A tied tensor is counted once, under its first name, so each holder adds its own
        # size. (Accelerate subtracts the outside tensor's size, which under-counts when the
        # counted copy is the outside one; the two agree everywhere else.)
        return self.sizes.get(name, 0) + sum(self.sizes.get(h, 0) for h in dict.fromkeys(holders))

    def _remove(self, name: str) -> int:
        index = self.queue.index(name)
        del self.queue[index]
        self.queued.discard(name)
        return index

    def _push(self, name: str) -> None:
        self.queue.append(name)
        self.queued.add(name)

    def run(self) -> DeviceMap:
        """Place every queued entry; return the cleaned map."""
        while self.queue:
            name = self.queue.pop()
            self.queued.discard(name)
            self._forget(name)
            self._step(name)
        return DeviceMap(entries=_clean(self.entries),
                         usage=tuple((d, b) for d, b in self.held.items() if b > 0))

    def _step(self, name: str) -> None:
        """Place ``name`` on the current device, split it, or move on to the next device."""
        size = self.sizes.get(name, 0)
        tied, holders = self._ties(name)
        device = self.devices[self.current]
        limit, reserved = self.budgets[device], 0
        if limit is not None and device in self.main:
            limit, reserved = limit - self.max_size, self.max_size
        with_ties = self._with_ties(name, holders)
        if limit is None or self.used[device] + with_ties <= limit:
            self.used[device] += with_ties
            self.held[device] += with_ties
            self.entries[name] = device
            if self.buffer_sizes is not None and device in ("cpu", "disk"):
                # Accelerate counts module entries only; a top-level buffer entry placed
                # there stays on the executing GPU as well, so it is counted too
                self.offloaded_buffers += self.buffer_sizes.get(name, 0)
            for holder in holders:
                if holder in self.queued:
                    self._remove(holder)
                self.entries[holder] = device
            return
        if tied and self.used[device] + size <= limit:
            for holder in holders:
                if self._splittable(holder):
                    index = self._remove(holder)
                    parts = self._parts(holder)
                    self.queue[index:index] = parts[::-1]
                    self.queued.update(parts)
                    self._push(name)
                    self._refresh()
                    return
        if self.used[device] + size >= limit and self._splittable(name):
            for part in reversed(self._parts(name)):
                self._push(part)
            self._refresh()
            return
        if self.fallback and self.used[device] == 0 and device != "disk" and \
                self.fallen.get(device) != name and self._fall_back(device, name, with_ties):
            return
        if self.used[device] == 0:
            self.needed[device] = with_ties + reserved
        self.used[device] += reserved
        self.current += 1
        if self.current == len(self.devices):
            self._fail(name, with_ties)
        self._push(name)

    def _fall_back(self, device: Device, name: str, with_ties: int) -> bool:
        """Find a later module small enough for the empty ``device``; queue it before ``name``.

        Accelerate's ``fallback_allocate``: the room is the budget less the larger of the
        largest layer still to place and ``name`` with its ties; the queue is searched front
        to back, splitting what is too large and can be split. Returns whether one was found.
        """
        budget = self.budgets[device] or 0  # only the disk has no budget
        reserve = max(self.max_size, with_ties)
        found = self._search(name, budget - reserve) if budget >= reserve else None
        if found is None:
            if budget > 0:  # a device given nothing to hold is no surprise
                self.missed.setdefault(device, (budget, reserve))
            return False
        self.fallen[device] = found
        parts = found.split(".")
        for depth in range(1, len(parts)):  # split the queued modules above it
            above = ".".join(parts[:depth])
            if above in self.queued:
                index = self._remove(above)
                inner = self._parts(above)
                self.queue[index:index] = inner[::-1]
                self.queued.update(inner)
        self._remove(found)
        self._push(name)
        self._push(found)
        return True

    def _search(self, name: str, room: int) -> str | None:
        """The first queued entry (or part of one) that fits in ``room`` with its ties.

        Ties are resolved against the queue as the search splits it, ``name`` (which goes
        back to the queue) included, as Accelerate does. (Accelerate fails with an
        ``IndexError`` where a tied tensor lies in ``name`` or in an entry the search passed
        over; here it counts that entry, as the placement that follows will.)
        """
        stack = list(self.queue)  # a stack as well: its front is the end
        among = {*stack, name}
        while stack:
            candidate = stack.pop()
            _, holders = self._ties(candidate, among)
            if self._with_ties(candidate, holders) <= room:
                return candidate
            if self._splittable(candidate):
                inner = self._parts(candidate)
                stack.extend(reversed(inner))
                among.discard(candidate)
                among.update(inner)
        return None

    def cautions(self) -> list[str]:
        """What the caller should warn about after `run`: devices the fallback left empty,
        and the buffers of offloaded modules that fit in no GPU (with ``offload_buffers=False``).
        """
        out = []
        for device, (budget, reserve) in self.missed.items():
            out.append(
                f"infer_device_map(): fallback_allocation=True found no module for {device!r}, "
                f"so it holds no weights: its budget is {budget} bytes, and with {reserve} "
                "bytes kept free (for the largest layer still to place, or the module that "
                f"did not fit) no module fits in the {max(budget - reserve, 0)} bytes left. "
                "Give it a larger budget (or leave it out of max_memory), or use smaller "
                "no-split blocks.")
        total = self.offloaded_buffers
        gpus = [d for d in self.devices if d not in ("cpu", "disk")]
        if total and gpus and not any(
                (self.budgets[g] or 0) >= total + self.used[g] for g in gpus):
            left = {g: max((self.budgets[g] or 0) - self.used[g], 0) for g in gpus}
            out.append(
                f"infer_device_map(): the buffers of the modules placed on 'cpu' or 'disk' "
                f"({total} bytes) stay on the executing GPU unless offload_buffers=True, but "
                f"they fit in no GPU's remaining budget (bytes left: {left}). Pass "
                "offload_buffers=True (to load_checkpoint_and_dispatch, or to dispatch) to "
                "offload them with their modules' weights, or give the GPUs more room.")
        return out

    def _fail(self, name: str, size: int) -> None:
        budgets = {d: b for d, b in self.budgets.items() if b is not None}
        msg = (f"infer_device_map(): the model must fit in max_memory, but got max_memory="
               f"{budgets} for a model of {self.sizes.get('', 0)} bytes: {name!r} "
               f"({size} bytes with its tied weights) fits on no device (smallest need per "
               f"device, with room for the largest layer: {self.needed}). Raise the budgets, "
               "or allow disk offload (leave 'disk' out of max_memory, or give it room).")
        raise DeviceMapError(msg)


def _clean(entries: Mapping[str, Device]) -> tuple[tuple[str, Device], ...]:
    """Merge every subtree whose entries all share one device into one entry."""
    tree: dict[Any, Any] = {}
    for name, device in entries.items():
        node = tree
        for part in name.split(".") if name else []:
            node = node.setdefault(part, {})
        node[None] = device
    out: list[tuple[str, Device]] = []
    _emit(tree, "", out)
    return tuple(out)


_MIXED = object()


def _uniform(node: dict[Any, Any]) -> tuple[Any, int]:
    value, count = _MIXED, 0
    for key, child in node.items():
        child_value, child_count = (child, 1) if key is None else _uniform(child)
        if child_count == 0:
            continue
        if child_value is _MIXED or (count and child_value != value):
            return _MIXED, count + child_count
        value, count = child_value, count + child_count
    return value, count


def _emit(node: dict[Any, Any], name: str, out: list[tuple[str, Device]]) -> None:
    below = {k: v for k, v in node.items() if k is not None}
    value, count = _uniform(below)
    if None in node:
        out.append((name, node[None]))
    if value is not _MIXED and count > 1:
        out.append((name, value))
        return
    for key, child in below.items():
        _emit(child, f"{name}.{key}" if name else key, out)


def plan_layout(layout: Layout, sizes: Mapping[str, int], budgets: Mapping[Device, int],
                no_split: frozenset[str] = frozenset(), *,
                fallback_allocation: bool = False) -> DeviceMap:
    """The pure planner: fill ``budgets`` (ordered GPUs, mps, cpu, disk) with ``layout``.

    With ``fallback_allocation``, a device left empty gets a smaller module from further on
    (see `infer_device_map`), and a warning names each device for which there was none.

    Examples:
        >>> from distlib.big_model.sizes import TensorInfo, layout_from_tensors, module_sizes
        >>> layout = layout_from_tensors(
        ...     [TensorInfo(name=f"h.{i}.w", numel=100, dtype="float32") for i in range(3)])
        >>> plan_layout(layout, module_sizes(layout), {0: 900, "cpu": 2000}).as_dict()
        {'h.0': 0, 'h.1': 'cpu', 'h.2': 'cpu'}
    """
    check_switch(fallback_allocation, "fallback_allocation", source="plan_layout()")
    planner = _Planner(layout, sizes, budgets, no_split, fallback=fallback_allocation)
    plan = planner.run()
    for warning in planner.cautions():
        warnings.warn(warning, UserWarning, stacklevel=2)
    return plan
