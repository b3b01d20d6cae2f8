"""Disk-offloaded weights: where they live, written once, read through memory maps.

A weight mapped to ``"disk"`` stays in the checkpoint's own safetensors bytes when it can be
read as is, else it is written once to the offload folder; either way it is an
`OffloadSource`, recorded on the model (`OFFLOAD_ATTR`) and in the folder's ``index.json``
(checked entry by entry when read back, never unpickled). `dispatch`'s hooks read them
through `open_source`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from distlib.big_model.files import (
    DTYPE_ITEMSIZE,
    OffloadSource,
    is_count,
    map_file,
    numel,
    read_safetensors_header,
    view_of,
)
from distlib.big_model.sizes import dtype_name
from distlib.errors import CheckpointError

__all__ = ["OFFLOAD_ATTR", "offload_tensor", "open_source", "read_offload_index",
           "write_offload_index"]

OFFLOAD_ATTR = "distlib_offload"  # model attribute: {tensor name: OffloadSource}


def offload_tensor(name: str, view: Any, src: OffloadSource | None, target: Any,
                   folder: str | os.PathLike[str] | None) -> OffloadSource:
    """Keep a disk weight where it is when it can be read as is; else write it once.

    Args:
        name: the tensor's name (the file ``<folder>/<name>.safetensors`` when written).
        view: the tensor's value.
        src: where it already is in a checkpoint's safetensors file (None: a .bin/.pt file).
        target: the dtype it must have.
        folder: the offload folder (None: only weights that can stay where they are).

    Raises:
        CheckpointError: it must be written but ``folder`` is None.

    Effects: may create ``folder`` and write one safetensors file.
    """
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
    elif entry["dtype"] not in DTYPE_ITEMSIZE:
        problem = f"has the dtype {entry['dtype']!r:.40}"
    elif not (isinstance(entry["shape"], list) and all(is_count(d) for d in entry["shape"])
              and is_count(entry["offset"]) and is_count(entry["nbytes"])):
        problem = f"has the shape/offset/nbytes {entry['shape']!r:.60}/{entry['offset']!r}/" \
                  f"{entry['nbytes']!r}"
    elif entry["nbytes"] != numel(entry["shape"]) * DTYPE_ITEMSIZE[entry["dtype"]]:
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




def open_source(src: OffloadSource, cache: dict[str, Any]) -> Any:
    """Return a tensor viewing ``src`` through a memory map (``cache`` keeps maps per file)."""
    if src.file not in cache:
        cache[src.file] = map_file(src.file)
    return view_of(cache[src.file], src)
