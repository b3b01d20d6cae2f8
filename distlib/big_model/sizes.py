"""What the planner knows about a model, as plain values: its layout and byte sizes.

`layout_of(model)` reads names, shapes, dtypes, classes and ties from a module (on any
device, the meta device included); `layout_from_tensors` builds the same value from a
checkpoint's headers alone. `module_sizes` turns a layout into bytes per module for a target
dtype, counting tied parameters once. Nothing here allocates tensors or asks the hardware.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distlib.errors import DeviceMapError

__all__ = [
    "Layout",
    "ModuleInfo",
    "TensorInfo",
    "dtype_name",
    "dtype_size",
    "layout_from_tensors",
    "layout_of",
    "module_sizes",
    "parse_size",
]

_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
_SIZE = re.compile(r"^\s*([+-]?(?:[0-9]*\.?[0-9]+|inf|infinity|nan))\s*([KMGT]I?B|B)?\s*$",
                   re.IGNORECASE)
_BITS = {"bool": 8, "float8_e4m3fn": 8, "float8_e5m2": 8, "float8_e4m3fnuz": 8,
         "float8_e5m2fnuz": 8, "float8_e8m0fnu": 8, "uint8": 8, "int8": 8}
_INTEGER_PREFIXES = ("int", "uint", "bool")


_MAX_BYTES = 2**63  # torch counts bytes in int64; no machine has 8 EiB of memory
_SIZE_RULE = ("be a memory size: a whole number of bytes in [0, 2**63) or a string such as "
              "'10GiB', '10GB' or '500MB'")


def parse_size(size: int | float | str, *, source: str = "parse_size()") -> int:
    """Return a memory size in bytes from an int or a string like ``"10GiB"``, ``"500MB"``.

    ``GiB``/``MiB``/``KiB`` are powers of 1024, ``GB``/``MB``/``KB`` powers of 1000. There is
    no "unlimited": infinite, NaN, negative and absurd sizes (2**63 bytes and up) are refused.

    Raises:
        DeviceMapError: naming ``source``, the value and the fix.

    Examples:
        >>> parse_size("10GiB"), parse_size("500MB"), parse_size(123)
        (10737418240, 500000000, 123)
    """
    found: float | None = None
    if isinstance(size, bool):
        pass
    elif isinstance(size, (int, float)):
        found = size
    elif isinstance(size, str) and (match := _SIZE.match(size)):
        number, unit = match.group(1), _UNITS[(match.group(2) or "B").upper()]
        found = int(number) * unit if number.lstrip("+-").isdigit() else float(number) * unit
    if found is not None and 0 <= found < _MAX_BYTES:  # False for NaN
        return int(found)
    if found is not None and found == math.inf:
        fix = ("There is no unlimited size: give a real one (in max_memory, a 'disk' left "
               "unnamed is unlimited, and max_memory=None asks the hardware).")
    elif found is not None and found >= _MAX_BYTES:
        fix = "No machine has that much memory: check the number and its unit."
    elif found is not None and found < 0:
        fix = "A budget cannot be negative; use 0 to keep everything off that device."
    else:
        fix = ("Write bytes as a number, or a number and a unit: B, KB, MB, GB, TB, KiB, MiB, "
               "GiB, TiB.")
    name = f"{source}: the size" if source.endswith("()") else source
    msg = f"{name} must {_SIZE_RULE}, but got {size!r}. {fix}"
    raise DeviceMapError(msg)


def dtype_name(dtype: Any) -> str:
    """Return a dtype's short name: ``torch.bfloat16`` / ``"torch.bfloat16"`` -> ``"bfloat16"``.

    Examples:
        >>> dtype_name("torch.float16"), dtype_name("bf16")
        ('float16', 'bfloat16')
    """
    name = str(dtype).removeprefix("torch.")
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16",
            "float": "float32", "double": "float64"}.get(name, name)


def dtype_size(dtype: Any) -> int:
    """Return the bytes one element of ``dtype`` takes (bool counts as one byte).

    Examples:
        >>> dtype_size("float32"), dtype_size("bfloat16"), dtype_size("int64")
        (4, 2, 8)
    """
    name = dtype_name(dtype)
    bits = _BITS.get(name)
    if bits is None:
        match = re.search(r"(\d+)$", name)
        if match is None:
            msg = f"dtype_size(): dtype must be a torch dtype name, but got {dtype!r}."
            raise DeviceMapError(msg)
        bits = int(match.group(1))
    return max(bits // 8, 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo:
    """One parameter or buffer: full dotted name, element count, dtype name, kind."""

    name: str
    numel: int
    dtype: str
    buffer: bool = False
    shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.numel < 0:
            msg = f"TensorInfo(): numel must be >= 0, but got {self.numel!r} for {self.name!r}."
            raise DeviceMapError(msg)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleInfo:
    """One module: dotted name ("" for the root), class name, children, direct tensors."""

    name: str
    class_name: str
    children: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """A model's structure for planning: modules in pre-order (root first), tensors, ties.

    ``tensors`` lists parameters (each shared parameter once, under its first name) and then
    buffers, in the order ``named_parameters()`` / ``named_buffers()`` give them. ``tied``
    groups the names that share one parameter.
    """

    modules: tuple[ModuleInfo, ...]
    tensors: tuple[TensorInfo, ...]
    tied: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.modules or self.modules[0].name != "":
            msg = "Layout(): modules must start with the root module named '', but got none."
            raise DeviceMapError(msg)

    def module_index(self) -> dict[str, ModuleInfo]:
        """Return the modules by name."""
        return {m.name: m for m in self.modules}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def layout_of(model: Any) -> Layout:
    """Describe a ``torch.nn.Module`` (on any device, meta included) as a `Layout`.

    One pass over the module tree (``named_modules``, ``named_parameters`` and
    ``named_buffers`` orders, shared tensors listed once), fast enough for 100,000 modules.

    Examples:
        >>> import torch
        >>> layout = layout_of(torch.nn.Sequential(torch.nn.Linear(2, 3)))
        >>> [t.name for t in layout.tensors], layout.modules[1].class_name
        (['0.weight', '0.bias'], 'Linear')
    """
    modules: list[ModuleInfo] = []
    params: list[TensorInfo] = []
    buffers: list[TensorInfo] = []
    seen_modules: set[int] = set()
    seen: set[int] = set()
    names: dict[int, list[str]] = {}
    dtypes: dict[Any, str] = {}
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        dot = f"{prefix}." if prefix else ""
        own = [(dot + n, v) for n, v in module._parameters.items() if v is not None]
        own_buffers = [(dot + n, v) for n, v in module._buffers.items() if v is not None]
        children = [(dot + n, m) for n, m in module._modules.items() if m is not None]
        modules.append(ModuleInfo(name=prefix, class_name=type(module).__name__,
                                  children=tuple(n for n, _ in children),
                                  params=tuple(n for n, _ in own),
                                  buffers=tuple(n for n, _ in own_buffers)))
        for name, param in own:
            names.setdefault(id(param), []).append(name)
        if id(module) not in seen_modules:
            seen_modules.add(id(module))
            for is_buffer, group, out in ((False, own, params), (True, own_buffers, buffers)):
                for name, tensor in group:
                    if id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                    if tensor.dtype not in dtypes:
                        dtypes[tensor.dtype] = dtype_name(tensor.dtype)
                    out.append(TensorInfo(name=name, numel=tensor.numel(),
                                          dtype=dtypes[tensor.dtype], buffer=is_buffer,
                                          shape=tuple(tensor.shape)))
        stack.extend(reversed(children))
    tied = tuple(tuple(sorted(group)) for group in names.values() if len(group) > 1)
    return Layout(modules=tuple(modules), tensors=tuple(params + buffers), tied=tied)


def tied_groups(model: Any) -> tuple[tuple[str, ...], ...]:
    """Return the groups of parameter names that share one tensor, each sorted.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Linear(2, 5, bias=False))
        >>> net[1].weight = net[0].weight
        >>> tied_groups(net)
        (('0.weight', '1.weight'),)
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return tuple(tuple(sorted(group)) for group in names.values() if len(group) > 1)


def layout_from_tensors(tensors: Iterable[TensorInfo],
                        tied: Sequence[Sequence[str]] = ()) -> Layout:
    """Build a `Layout` from tensor names alone (a checkpoint's headers).

    Every dotted prefix becomes a module. Its class name is its name with each numeric part
    replaced by ``*`` (``model.layers.*``), so ``no_split_module_classes=["model.layers.*"]``
    keeps each numbered block whole.

    Examples:
        >>> infos = [TensorInfo(name=f"layers.{i}.w", numel=4, dtype="float32") for i in range(2)]
        >>> [(m.name, m.class_name) for m in layout_from_tensors(infos).modules][:3]
        [('', ''), ('layers', 'layers'), ('layers.0', 'layers.*')]
    """
    tensors = tuple(tensors)
    children: dict[str, list[str]] = {"": []}
    params: dict[str, list[str]] = {"": []}
    for info in tensors:
        parts = info.name.split(".")
        for depth in range(1, len(parts)):
            module, parent = ".".join(parts[:depth]), ".".join(parts[:depth - 1])
            if module not in children:
                children[module], params[module] = [], []
                children[parent].append(module)
        params[".".join(parts[:-1])].append(info.name)
    modules = []
    stack = [""]
    while stack:
        name = stack.pop()
        kind = ".".join("*" if p.isdigit() else p for p in name.split(".")) if name else ""
        modules.append(ModuleInfo(name=name, class_name=kind, children=tuple(children[name]),
                                  params=tuple(params[name])))
        stack.extend(reversed(children[name]))
    return Layout(modules=tuple(modules), tensors=tensors, tied=tuple(tuple(g) for g in tied))


def _in_modules(name: str, modules: Sequence[str]) -> bool:
    return any(name == m or name.startswith(m + ".") or f".{m}." in f".{name}" for m in modules)


def module_sizes(layout: Layout, dtype: Any = None,
                 keep_in_fp32_modules: Sequence[str] = ()) -> dict[str, int]:
    """Return the bytes of every module and tensor name (and ``""``, the whole model).

    With a ``dtype``, floating tensors are counted at the smaller of their own and the target
    element size (weights are never up-cast on load); integer and bool tensors keep theirs.
    Tensors inside ``keep_in_fp32_modules`` count as float32. Tied parameters count once.

    Examples:
        >>> infos = [TensorInfo(name="a.w", numel=10, dtype="float32")]
        >>> module_sizes(layout_from_tensors(infos), dtype="bfloat16")
        {'': 20, 'a': 20, 'a.w': 20}
    """
    target = None if dtype is None else dtype_size(dtype)
    sizes: dict[str, int] = {"": 0}
    widths: dict[str, int] = {}
    for info in layout.tensors:
        if info.dtype not in widths:
            widths[info.dtype] = dtype_size(info.dtype)
        own = widths[info.dtype]
        if keep_in_fp32_modules and _in_modules(info.name, keep_in_fp32_modules) and \
                not info.dtype.startswith(_INTEGER_PREFIXES):
            own = 4
        elif target is not None and not info.dtype.startswith(_INTEGER_PREFIXES):
            own = min(own, target)
        size = info.numel * own
        sizes[""] += size
        key = ""
        for part in info.name.split("."):
            key = f"{key}.{part}" if key else part
            sizes[key] = sizes.get(key, 0) + size
    return sizes


def coerce_layout(model_or_layout: Any) -> Layout:
    """Return the argument if it is a `Layout`, else `layout_of` it."""
    return model_or_layout if isinstance(model_or_layout, Layout) else layout_of(model_or_layout)


def keep_in_fp32_of(model: Any, explicit: Sequence[str] | None) -> tuple[str, ...]:
    """The module names a model keeps in fp32 (transformers' ``_keep_in_fp32_modules``)."""
    if explicit is not None:
        return tuple(explicit)
    found = getattr(model, "_keep_in_fp32_modules", None) or ()
    if isinstance(found, Mapping):
        found = tuple(found)
    return tuple(found)
