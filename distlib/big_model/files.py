"""Reading checkpoints without loading them whole: safetensors, ``.bin``/``.pt``, sharded.

Safetensors files are memory-mapped and parsed from their header; each tensor is read as a
view of the map and copied once, to where it goes. ``.bin``/``.pt`` files are opened with
``torch.load(weights_only=True, mmap=True)``: tensors only, never arbitrary objects.
`load_checkpoint` streams tensor by tensor, so peak memory stays near what stays resident
plus one tensor; weights planned for ``"disk"`` are left in the checkpoint's own files (or
written once to ``offload_folder``) and recorded as `OffloadSource` values.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from distlib.big_model.device_map import DeviceMap, check_devices_exist, visible_devices
from distlib.big_model.sizes import TensorInfo, dtype_name, keep_in_fp32_of
from distlib.errors import CheckpointError

__all__ = ["OFFLOAD_ATTR", "OffloadSource", "checkpoint_files", "checkpoint_tensors",
           "drop_pages", "load_checkpoint", "open_source", "read_safetensors_header"]

OFFLOAD_ATTR = "distlib_offload"  # model attribute: {tensor name: OffloadSource}
_SAFE_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                "U16": "uint16", "U32": "uint32", "U64": "uint64"}
_SAFE_INDEX, _SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
_BIN_INDEX, _BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
_TORCH_EXT = (".bin", ".pt", ".pth")


@dataclass(frozen=True, slots=True, kw_only=True)
class OffloadSource:
    """Where a disk-offloaded tensor lives: a safetensors file and the bytes inside it."""

    file: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


_MAX_HEADER = 100_000_000  # safetensors' own limit
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_FLOATING = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
_TORCH_ITEMSIZE = {_SAFE_DTYPES[code]: size for code, size in _ITEMSIZE.items()}


def _corrupt(path: str, rule: str, got: str) -> CheckpointError:
    msg = (f"load_checkpoint(): {path} must be a valid safetensors file whose {rule}, but got "
           f"{got}. The file is corrupt or not safetensors; download or save it again.")
    return CheckpointError(msg)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN/Infinity; serde does not


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_header(path: str, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _corrupt(path, "header is UTF-8", f"an invalid byte at {exc.start}") from None
    if not text.startswith("{"):
        raise _corrupt(path, "header starts with '{'", repr(text[:10]))
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise _corrupt(path, "header is a JSON object", f"{type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is a JSON object", type(header).__name__)
    return header


def _check_entry(path: str, name: str, meta: Any) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype code, shape, begin, end) of one tensor entry, each field checked."""
    if not isinstance(meta, dict) or not set(meta) >= _ENTRY_KEYS:  # others ignored, as there
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise _corrupt(path, f"tensor {name!r} has the keys {sorted(_ENTRY_KEYS)}", repr(keys))
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise _corrupt(path, f"tensor {name!r} has a dtype distlib reads (one of "
                       f"{', '.join(_ITEMSIZE)})", repr(dtype))
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _corrupt(path, f"tensor {name!r} has a shape of non-negative ints", repr(shape))
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise _corrupt(path, f"tensor {name!r} has data_offsets [begin, end] of non-negative "
                       "ints", repr(offsets))
    begin, end = offsets
    nbytes = _numel(shape) * _ITEMSIZE[dtype]
    if end - begin != nbytes:
        raise _corrupt(path, f"tensor {name!r} spans shape x itemsize bytes ({shape} x "
                       f"{_ITEMSIZE[dtype]} for {dtype} = {nbytes})",
                       f"data_offsets {offsets} ({end - begin} bytes)")
    return dtype, tuple(shape), begin, end


def read_safetensors_header(path: str) -> dict[str, OffloadSource]:
    """Parse a safetensors header, validated as strictly as safetensors does, before any read.

    The header length must fit the file (and safetensors' 100 MB limit); the header must be
    UTF-8 JSON, an object with no repeated key; each tensor has a known dtype, a shape of
    non-negative ints and ``data_offsets`` spanning exactly numel x itemsize bytes; sorted,
    the offsets start at 0, follow each other without gap or overlap and end at the end of
    the file; ``__metadata__`` maps strings to strings.

    Raises:
        CheckpointError: the file breaks one of these rules (named, with the tensor).

    Examples:
        >>> import os, tempfile, torch
        >>> from safetensors.torch import save_file
        >>> file = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> save_file({"a": torch.zeros(2, 3)}, file)
        >>> src = read_safetensors_header(file)["a"]
        >>> src.dtype, src.shape, src.nbytes
        ('float32', (2, 3), 24)
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER):
            msg = (f"load_checkpoint(): {path} must be a safetensors file, but its header length "
                   f"is {length} bytes in a {size}-byte file. The file is truncated or not "
                   "safetensors; download or save it again.")
            raise CheckpointError(msg)
        header = _parse_header(path, handle.read(length))
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise _corrupt(path, "__metadata__ maps strings to strings", repr(metadata)[:100])
    base = 8 + length
    entries = sorted(((name, *_check_entry(path, name, meta)) for name, meta in header.items()),
                     key=lambda e: (e[3], e[4]))
    out, end = {}, 0
    for name, dtype, shape, begin, stop in entries:
        if begin != end:
            rule = "tensors follow each other from byte 0 without gap or overlap"
            raise _corrupt(path, rule, f"tensor {name!r} at data_offsets [{begin}, {stop}] "
                           f"where the previous one ends at {end}")
        end = stop
        out[name] = OffloadSource(file=os.path.abspath(path), offset=base + begin,
                                  nbytes=stop - begin, dtype=_SAFE_DTYPES[dtype], shape=shape)
    if base + end != size:
        if base + end > size:
            msg = (f"load_checkpoint(): {path} must hold the {base + end} bytes its header "
                   f"promises, but it has {size}. The file is truncated (an interrupted "
                   "download or copy?); download or save it again.")
            raise CheckpointError(msg)
        raise _corrupt(path, "tensors cover the data section up to the end of the file",
                       f"{size - base - end} bytes after the last tensor")
    return out


def _index_files(path: str) -> list[str]:
    """The shard files an index names (each once, in order), after checking the index."""
    def refuse(rule: str, got: str,
               fix: str = "The index is damaged; download it again.") -> NoReturn:
        msg = f"load_checkpoint(): {path} must {rule}, but {got}. {fix}"
        raise CheckpointError(msg)

    try:
        with open(path, encoding="utf-8") as handle:
            body = json.load(handle)
    except (OSError, ValueError) as exc:
        refuse("be a JSON checkpoint index", f"reading it failed ({type(exc).__name__}: "
               f"{str(exc)[:200]})")
    weight_map = body.get("weight_map") if isinstance(body, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        refuse("hold a 'weight_map' object of tensor name -> shard file",
               f"got {type(weight_map).__name__ if weight_map is not None else 'none'}")
    folder = os.path.dirname(path)
    files = []
    for name in dict.fromkeys(weight_map.values()):
        if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            refuse("name shard files inside its folder", f"it names {name!r}")
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            first = next(k for k, v in weight_map.items() if v == name)
            refuse("name shard files that exist", f"{file} (holding {first!r}, ...) is missing",
                   "The download is incomplete; fetch the missing shard.")
        files.append(file)
    return files


def checkpoint_files(checkpoint: str | os.PathLike[str]) -> tuple[str, ...]:
    """Return the files of a checkpoint: a file, an index, or a folder (safetensors first).

    Raises:
        CheckpointError: nothing loadable is there.
    """
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        for preferred in (_SAFE_INDEX, _SAFE_SINGLE, None, _BIN_INDEX, _BIN_SINGLE):
            if preferred is None:
                found = [n for n in names if n.endswith(".safetensors")]
            elif preferred in names:
                found = [preferred]
            else:
                continue
            if found:
                files = [os.path.join(path, n) for n in found]
                return tuple(_index_files(files[0]) if files[0].endswith(".json") else files)
        found = [os.path.join(path, n) for n in names if n.endswith(_TORCH_EXT)]
        if found:
            return tuple(found)
    elif os.path.isfile(path):
        return tuple(_index_files(path)) if path.endswith(".json") else (path,)
    msg = (f"load_checkpoint(): checkpoint must be a .safetensors/.bin/.pt file, an index .json "
           f"or a folder holding them, but got {path!r}. Check the path.")
    raise CheckpointError(msg)


def _load_torch(path: str) -> Mapping[str, Any]:
    import torch

    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            with warnings.catch_warnings():  # old pickle protocols: refused below if unsafe
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        from distlib._safe_unpickle import _unsafe_globals

        msg = (f"load_checkpoint(): {path} must hold only tensors (it is opened with "
               f"weights_only=True), but it asks for {_unsafe_globals(path, exc)}. "
               "distlib never unpickles arbitrary objects; re-save the weights as "
               "safetensors from a trusted environment.")
        raise CheckpointError(msg) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        msg = (f"load_checkpoint(): {path} must be a readable torch checkpoint, but reading it "
               f"failed ({exc}). The file is truncated or corrupt; save it again.")
        raise CheckpointError(msg) from exc
    data = data.get("state_dict", data) if isinstance(data, Mapping) else data
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        msg = (f"load_checkpoint(): {path} must hold a state dict (names -> tensors), but it "
               f"holds a {type(data).__name__}.")
        raise CheckpointError(msg)
    return data


class _Reader:
    """The open files of one checkpoint; yields ``(name, tensor view, source)`` per tensor."""

    def __init__(self, files: Sequence[str]) -> None:
        self.files = files
        self.headers = {f: read_safetensors_header(f) for f in files if f.endswith(".safetensors")}
        self.torch = {f: _load_torch(f) for f in files if f not in self.headers}
        self.maps: dict[str, mmap.mmap | None] = {}
        seen: dict[str, str] = {}
        for file in files:
            for name in self.headers[file] if file in self.headers else self.torch[file]:
                if name in seen:
                    msg = (f"load_checkpoint(): each tensor must be stored in one file of the "
                           f"checkpoint, but got {name!r} in {seen[name]} and in {file}. The "
                           "shards do not belong together; download the checkpoint again.")
                    raise CheckpointError(msg)
                seen[name] = file

    def infos(self) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for header in self.headers.values():
            for name, src in header.items():
                out[name] = TensorInfo(name=name, numel=_numel(src.shape), dtype=src.dtype,
                                       shape=src.shape)
        for data in self.torch.values():
            for name, tensor in data.items():
                out[name] = TensorInfo(name=name, numel=tensor.numel(),
                                       dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape))
        return out

    def stream(self) -> Iterator[tuple[str, Any, OffloadSource | None]]:
        for file in self.files:
            if file in self.headers:
                self.maps[file] = _map(file)
                for name, src in sorted(self.headers[file].items(), key=lambda i: i[1].offset):
                    yield name, _view(self.maps[file], src), src
                self.maps.pop(file)
            else:
                for name, tensor in self.torch[file].items():
                    yield name, tensor, None

    def release(self, src: OffloadSource) -> None:
        """Drop the pages of ``src`` (already copied out) from this process's memory map."""
        drop_pages(self.maps.get(src.file), src)


def drop_pages(mapped: mmap.mmap | None, src: OffloadSource) -> None:
    """Unmap the whole pages inside ``src``'s bytes from this process (``MADV_DONTNEED``).

    The map is private and these pages were never written, so a later read faults the
    file's bytes back in (from the page cache when they are still there).
    """
    advice = getattr(mmap, "MADV_DONTNEED", None)
    start = -(-src.offset // mmap.PAGESIZE) * mmap.PAGESIZE
    stop = (src.offset + src.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if mapped is not None and advice is not None and stop > start:
        mapped.madvise(advice, start, stop - start)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _map(path: str) -> mmap.mmap | None:
    if os.path.getsize(path) == 0:
        return None
    with open(path, "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)


def _view(mapped: mmap.mmap | None, src: OffloadSource) -> Any:
    import torch

    dtype = getattr(torch, src.dtype)
    if mapped is None or src.nbytes == 0:
        return torch.empty(src.shape, dtype=dtype)
    return torch.frombuffer(mapped, dtype=dtype, count=_numel(src.shape),
                            offset=src.offset).view(src.shape)


def open_source(src: OffloadSource, cache: dict[str, Any]) -> Any:
    """Return a tensor viewing ``src`` through a memory map (``cache`` keeps maps per file)."""
    if src.file not in cache:
        cache[src.file] = _map(src.file)
    return _view(cache[src.file], src)


def checkpoint_tensors(checkpoint: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Return name -> `TensorInfo` for every tensor, reading headers only (no weights)."""
    return _Reader(checkpoint_files(checkpoint)).infos()


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
             and infos[n].dtype not in _FLOATING]
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
                    progress: Callable[[int], Any] | None = None, copy: bool = False) -> Any:
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
        progress: called with 1 after each tensor (a progress bar's ``update``).
        copy: copy CPU weights into private memory even when they could stay backed by
            the checkpoint's safetensors pages (copy-on-write memory maps, as
            ``safetensors.torch.load_file`` and ``torch.load(mmap=True)`` give).

    Returns:
        ``model``, modified in place.

    Raises:
        CheckpointError: the files are missing, corrupt, unsafe or do not match the model.
        DeviceMapError: ``device_map`` names a GPU (or MPS) this machine does not have.

    Effects: reads the files; moves tensors to devices; may write ``offload_folder``; sets the
    model's parameters and buffers and its ``distlib_offload`` attribute.

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
    files = checkpoint_files(checkpoint)
    reader = _Reader(files)
    infos = reader.infos()
    expected, empty = _model_tensors(model)
    groups = {n: g for g in _tied(model) for n in g}
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
    _stream_into(model, reader, expected, groups, dmap, _resolve_dtype(dtype),
                 keep_in_fp32_of(model, keep_in_fp32_modules), offload_folder, progress, copy)
    return model


def _tied(model: Any) -> tuple[tuple[str, ...], ...]:
    from distlib.big_model.sizes import tied_groups

    return tied_groups(model)


def _offload(name: str, view: Any, src: OffloadSource | None, target: Any,
             folder: str | os.PathLike[str] | None) -> OffloadSource:
    """Keep a disk weight where it is when it can be read as is; else write it once."""
    if src is not None and src.dtype == dtype_name(target):
        return src
    if folder is None:
        why = "needs a dtype conversion" if src is not None else "comes from a .bin/.pt file"
        msg = (f"load_checkpoint(): offload_folder must be given when a weight mapped to 'disk' "
               f"{why}, but got None for {name!r}. Pass offload_folder='offload' (any "
               "writable folder), or load safetensors in their stored dtype.")
        raise CheckpointError(msg)
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(os.fspath(folder), f"{name}.safetensors")
    save_file({name: view.to(dtype=target).contiguous()}, path)
    return read_safetensors_header(path)[name]


def write_offload_index(folder: str | os.PathLike[str], sources: Mapping[str, OffloadSource]) -> None:
    """Write ``index.json`` in ``folder``: where each disk-offloaded tensor lives.

    Effects: creates ``folder`` and writes the file.
    """
    os.makedirs(folder, exist_ok=True)
    body = {n: {"file": s.file, "offset": s.offset, "nbytes": s.nbytes, "dtype": s.dtype,
                "shape": list(s.shape)} for n, s in sources.items()}
    with open(os.path.join(folder, "index.json"), "w", encoding="utf-8") as handle:
        json.dump(body, handle)


def read_offload_index(folder: str | os.PathLike[str]) -> dict[str, OffloadSource]:
    """Read what `write_offload_index` wrote (empty when there is none), checking every entry.

    Raises:
        CheckpointError: the index is not JSON, or an entry's dtype, shape or byte range is
            not one a weight can have in the file it names.
    """
    path = os.path.join(folder, "index.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            body = json.load(handle)
    except (OSError, ValueError) as exc:
        msg = (f"dispatch(): {path} must be a JSON offload index written by load_checkpoint, "
               f"but reading it failed ({type(exc).__name__}: {str(exc)[:200]}). Delete the "
               "offload folder and load the checkpoint again.")
        raise CheckpointError(msg) from None
    if not isinstance(body, dict):
        msg = (f"dispatch(): {path} must be a JSON object of tensor name -> source, but got a "
               f"{type(body).__name__}. Delete the offload folder and load the checkpoint again.")
        raise CheckpointError(msg)
    return {name: _offload_entry(path, name, entry) for name, entry in body.items()}


def _offload_entry(path: str, name: str, entry: Any) -> OffloadSource:
    """One offload index entry as an `OffloadSource`, or the reason it cannot be one."""
    keys = {"file", "offset", "nbytes", "dtype", "shape"}
    problem = ""
    if not isinstance(entry, dict) or set(entry) != keys:
        problem = f"has the keys {sorted(entry) if isinstance(entry, dict) else entry!r:.80}"
    elif not isinstance(entry["file"], str) or not os.path.isfile(entry["file"]):
        problem = f"names a file that does not exist ({entry['file']!r:.200})"
    elif entry["dtype"] not in _TORCH_ITEMSIZE:
        problem = f"has the dtype {entry['dtype']!r:.40}"
    elif not (isinstance(entry["shape"], list) and all(_is_count(d) for d in entry["shape"])
              and _is_count(entry["offset"]) and _is_count(entry["nbytes"])):
        problem = f"has the shape/offset/nbytes {entry['shape']!r:.60}/{entry['offset']!r}/" \
                  f"{entry['nbytes']!r}"
    elif entry["nbytes"] != _numel(entry["shape"]) * _TORCH_ITEMSIZE[entry["dtype"]]:
        problem = f"spans {entry['nbytes']} bytes for shape {entry['shape']} of {entry['dtype']}"
    elif entry["offset"] + entry["nbytes"] > os.path.getsize(entry["file"]):
        problem = f"ends past the end of {entry['file']}"
    if problem:
        msg = (f"dispatch(): {path} must describe each offloaded weight by an existing file, a "
               f"known dtype and a byte range matching its shape, but {name!r} {problem}. "
               "Delete the offload folder and load the checkpoint again.")
        raise CheckpointError(msg)
    return OffloadSource(file=entry["file"], offset=entry["offset"], nbytes=entry["nbytes"],
                         dtype=entry["dtype"], shape=tuple(entry["shape"]))


def _stream_into(model: Any, reader: _Reader, expected: Mapping[str, Any],
                 groups: Mapping[str, tuple[str, ...]], dmap: DeviceMap | None, dtype: Any,
                 keep: Sequence[str], folder: str | os.PathLike[str] | None,
                 progress: Callable[[int], Any] | None, copy: bool) -> None:
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
                source = _offload(name, view, src, target, folder)
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
        if progress is not None:
            progress(1)
    object.__setattr__(model, OFFLOAD_ATTR, offloaded)
    if folder is not None and offloaded:
        write_offload_index(folder, offloaded)
