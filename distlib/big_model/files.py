"""Checkpoint files: safetensors headers, ``.bin``/``.pt`` state dicts, index files, memory maps.

Safetensors headers are validated as strictly as safetensors does before a byte of weights is
read; each tensor is then a view of a private memory map of its file (`CheckpointReader`).
``.bin``/``.pt`` files are opened with ``torch.load(weights_only=True, mmap=True)``: tensors
only, never arbitrary objects. Index files must name shard files inside their folder. Where a
tensor's bytes are is an `OffloadSource`; `distlib.big_model.loading` streams checkpoints with
these readers and `distlib.big_model.offload` keeps disk weights in such files.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from distlib._safe_unpickle import _unsafe_globals
from distlib.big_model.sizes import TensorInfo, dtype_name
from distlib.errors import CheckpointError

__all__ = ["DTYPE_ITEMSIZE", "FLOATING_DTYPES", "CheckpointReader", "OffloadSource",
           "checkpoint_files", "checkpoint_tensors", "drop_pages", "is_count", "map_file",
           "numel", "read_safetensors_header", "view_of"]

_SAFE_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                "U16": "uint16", "U32": "uint32", "U64": "uint64"}
_SAFE_INDEX, _SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
_BIN_INDEX, _BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
_TORCH_EXT = (".bin", ".pt", ".pth")


@dataclass(frozen=True, slots=True, kw_only=True)
class OffloadSource:
    """Where a tensor's bytes are: a safetensors file and the byte range inside it.

    A checkpoint's own tensors, and the disk-offloaded weights `dispatch` reads.
    """

    file: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


_MAX_HEADER = 100_000_000  # safetensors' own limit
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
FLOATING_DTYPES = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
DTYPE_ITEMSIZE = {_SAFE_DTYPES[code]: size for code, size in _ITEMSIZE.items()}


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


def is_count(value: Any) -> bool:
    """A non-negative int (not a bool): a dimension, an offset or a byte count."""
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
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise _corrupt(path, f"tensor {name!r} has a shape of non-negative ints", repr(shape))
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))):
        raise _corrupt(path, f"tensor {name!r} has data_offsets [begin, end] of non-negative "
                       "ints", repr(offsets))
    begin, end = offsets
    nbytes = numel(shape) * _ITEMSIZE[dtype]
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


class CheckpointReader:
    """The files of one checkpoint, headers read and checked; `stream` yields ``(name, tensor
    view, source)`` per tensor, each a view of the file's memory map (safetensors)."""

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
                out[name] = TensorInfo(name=name, numel=numel(src.shape), dtype=src.dtype,
                                       shape=src.shape)
        for data in self.torch.values():
            for name, tensor in data.items():
                out[name] = TensorInfo(name=name, numel=tensor.numel(),
                                       dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape))
        return out

    def nbytes(self) -> int:
        """The bytes of every tensor in the checkpoint (what `stream` yields, in all)."""
        total = sum(src.nbytes for header in self.headers.values() for src in header.values())
        return total + sum(int(t.numel() * t.element_size()) for data in self.torch.values()
                           for t in data.values())

    def stream(self) -> Iterator[tuple[str, Any, OffloadSource | None]]:
        for file in self.files:
            if file in self.headers:
                self.maps[file] = map_file(file)
                for name, src in sorted(self.headers[file].items(), key=lambda i: i[1].offset):
                    yield name, view_of(self.maps[file], src), src
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


def numel(shape: Sequence[int]) -> int:
    """The number of elements of a tensor of ``shape``."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def map_file(path: str) -> mmap.mmap | None:
    """A private (copy-on-write) memory map of the whole file; None for an empty file."""
    if os.path.getsize(path) == 0:
        return None
    with open(path, "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)


def view_of(mapped: mmap.mmap | None, src: OffloadSource) -> Any:
    """The tensor ``src`` describes, viewing the map's bytes (not copied)."""
    import torch

    dtype = getattr(torch, src.dtype)
    if mapped is None or src.nbytes == 0:
        return torch.empty(src.shape, dtype=dtype)
    return torch.frombuffer(mapped, dtype=dtype, count=numel(src.shape),
                            offset=src.offset).view(src.shape)


def checkpoint_tensors(checkpoint: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Return name -> `TensorInfo` for every tensor, reading headers only (no weights)."""
    return CheckpointReader(checkpoint_files(checkpoint)).infos()


