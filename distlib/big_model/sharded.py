"""Sharded loading: each rank reads only the slices of a checkpoint its DTensor shards hold.

A model wrapped by FSDP2 and/or tensor parallelism (``dl.wrap``) holds DTensor parameters,
often still on the meta device. `load_checkpoint` routes such a model here (`sharded_reader`):
`plan_local_runs` says which indices of each tensor dim a rank owns (pure, from the
placements: ``Shard(dim)`` on any dim with torch.chunk's uneven last shard, FSDP2's
``_StridedShard`` over a tensor-parallel shard, ``Replicate``), and `stream_shards` copies
exactly those bytes out of a private memory map of each safetensors file into the rank's
local shard, dropping the map's pages after each tensor. No rank ever holds the full model.
``.bin``/``.pt`` files cannot be sliced: rank 0 opens them (``weights_only=True``) and
broadcasts them tensor by tensor; each rank keeps its slices of each tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from distlib.big_model.files import (
    DTYPE_ITEMSIZE,
    CheckpointReader,
    OffloadSource,
    drop_pages,
    map_file,
    read_safetensors_header,
    view_of,
)
from distlib.big_model.sizes import TensorInfo, dtype_name
from distlib.errors import CheckpointError

__all__ = ["ShardedReader", "is_sharded", "plan_local_runs", "sharded_reader", "stream_shards"]

Runs = tuple[tuple[int, int], ...]  # [start, stop) ranges of one tensor dim, in order

# One mesh axis' placement on a tensor dim: (mesh axis size, this rank's coordinate on it,
# split factor). A split factor > 1 is torch's _StridedShard: it applies after the shards on
# mesh axes to its right (FSDP2 over a tensor-parallel shard), whose sizes multiply to it.
AxisShard = tuple[int, int, int]


def _take(runs: Runs, start: int, stop: int) -> Runs:
    """The indices at positions [start, stop) of the concatenated ``runs``."""
    out, seen = [], 0
    for begin, end in runs:
        lo, hi = max(start - seen, 0), min(stop - seen, end - begin)
        if lo < hi:
            out.append((begin + lo, begin + hi))
        seen += end - begin
    return tuple(out)


def _chunk(runs: Runs, num_chunks: int, coordinate: int) -> Runs:
    """torch.chunk's piece ``coordinate`` of ``num_chunks`` (trailing pieces may be empty)."""
    size = sum(end - begin for begin, end in runs)
    step = -(-size // num_chunks) if size else 0
    return _take(runs, step * coordinate, step * (coordinate + 1))


def _order(shards: Sequence[AxisShard], call: str) -> list[tuple[int, int]]:
    """(num_chunks, coordinate) in the order the shards apply (strided ones after theirs)."""
    if not shards:
        return []
    (num, coord, split), rest = shards[0], shards[1:]
    if split == 1:
        return [(num, coord), *_order(rest, call)]
    product = 1
    for count, (size, _, _) in enumerate(rest, start=1):
        product *= size
        if product == split:
            return [*_order(rest[:count], call), (num, coord), *_order(rest[count:], call)]
    msg = (f"{call}: a strided shard's split factor must be the product of the mesh axis sizes "
           f"sharding the same dim after it, but got split factor {split} before axes of sizes "
           f"{[s for s, _, _ in rest]}. This layout is not FSDP2 over tensor parallelism; load "
           "the checkpoint before wrapping, or wrap with dl.wrap.")
    raise CheckpointError(msg)


def plan_local_runs(size: int, shards: Sequence[AxisShard],
                    call: str = "load_checkpoint()") -> Runs:
    """Return the ranges of indices of one tensor dim of ``size`` that a rank's shard holds.

    ``shards`` lists, in mesh-axis order, each axis that shards this dim as ``(axis size,
    the rank's coordinate on the axis, split factor)``. Plain shards (split factor 1) apply
    left to right, each taking torch.chunk's piece of what the previous ones left (so the last
    pieces may be short or empty, as FSDP2's padded shards); a strided shard (split factor
    > 1, torch's ``_StridedShard``) applies after the shards to its right whose axis sizes
    multiply to its split factor: FSDP2 shards the piece tensor parallelism left.

    Raises:
        CheckpointError: a split factor that no run of later axes multiplies to.

    Examples:
        >>> plan_local_runs(10, [(4, 3, 1)])           # the uneven last of 4 shards
        ((9, 10),)
        >>> plan_local_runs(8, [(2, 1, 2), (2, 0, 1)])  # FSDP rank 1 over tp rank 0
        ((2, 4),)
        >>> plan_local_runs(5, [])                     # replicated: all of it
        ((0, 5),)
    """
    runs: Runs = ((0, size),) if size else ()
    for num_chunks, coordinate in _order(shards, call):
        runs = _chunk(runs, num_chunks, coordinate)
    merged: list[tuple[int, int]] = []
    for begin, end in runs:
        if merged and merged[-1][1] == begin:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((begin, end))
    return tuple(merged) if merged or size == 0 else ()


def _dtensor_type() -> Any:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: Any) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2 or tensor parallelism)."""
    dtensor = _dtensor_type()
    return any(isinstance(p, dtensor) for p in model.parameters())


def _local_runs(tensor: Any, call: str) -> tuple[Runs, ...]:
    """The index ranges of each dim of ``tensor`` (a DTensor) that this rank holds."""
    mesh, placements = tensor.device_mesh, tensor.placements
    coordinate = mesh.get_coordinate()
    per_dim: list[list[AxisShard]] = [[] for _ in tensor.shape]
    for axis, placement in enumerate(placements):
        # torch's _StridedShard is no Shard subclass; it has a dim and a split factor
        split = getattr(placement, "split_factor", None)
        if placement.is_shard() or (split is not None and hasattr(placement, "dim")):
            per_dim[placement.dim].append((mesh.size(axis), coordinate[axis], int(split or 1)))
        elif not placement.is_replicate():
            msg = (f"{call}: a parameter's placements must be Shard or Replicate to load it, "
                   f"but got {placement!r} in {placements}. Load before this transformation.")
            raise CheckpointError(msg)
    return tuple(plan_local_runs(size, shards, call)
                 for size, shards in zip(tensor.shape, per_dim, strict=True))


def _boxes(runs: tuple[Runs, ...]) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(slices in the full tensor, slices in the local shard) for each box of the runs."""
    def product(dim: int, src: tuple[slice, ...], dst: tuple[slice, ...]) -> Iterator[Any]:
        if dim == len(runs):
            yield src, dst
            return
        at = 0
        for begin, end in runs[dim]:
            inside = slice(at, at + end - begin)
            yield from product(dim + 1, (*src, slice(begin, end)), (*dst, inside))
            at += end - begin
    yield from product(0, (), ())


def _home_device(model: Any) -> Any:
    """Where tensors that were on the meta device go: the DTensors' mesh device."""
    import torch

    dtensor = _dtensor_type()
    mesh = next(p.device_mesh for p in model.parameters() if isinstance(p, dtensor))
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, mesh.device_type)
    return torch.device(mesh.device_type, module.current_device())


class ShardedReader:
    """The files of a checkpoint read by every rank of a sharded model.

    Safetensors headers are read (and checked) on every rank; ``.bin``/``.pt`` files are
    opened on rank 0 only, and the names, shapes and dtypes they hold are broadcast.

    Effects: on a torch-format checkpoint, a collective over the default process group.
    """

    def __init__(self, files: Sequence[str], home: Any) -> None:
        self.files, self.home = tuple(files), home
        self.headers = {f: read_safetensors_header(f) for f in files
                        if f.endswith(".safetensors")}
        torch_files = [f for f in files if f not in self.headers]
        self.torch: CheckpointReader | None = None
        self.broadcast: list[tuple[str, tuple[int, ...], str]] = []
        if torch_files:
            self.torch, self.broadcast = _open_on_rank_0(torch_files)

    def infos(self) -> dict[str, TensorInfo]:
        """Name -> `TensorInfo` of every tensor in the checkpoint (headers only)."""
        out = {name: TensorInfo(name=name, numel=math.prod(src.shape), dtype=src.dtype,
                                shape=src.shape)
               for header in self.headers.values() for name, src in header.items()}
        out.update({name: TensorInfo(name=name, numel=math.prod(shape), dtype=dtype, shape=shape)
                    for name, shape, dtype in self.broadcast})
        return out

    def nbytes(self) -> int:
        """The bytes of every tensor in the checkpoint (the progress bar's total)."""
        return sum(info.numel * DTYPE_ITEMSIZE[info.dtype] for info in self.infos().values())

    def safetensors(self) -> Iterator[tuple[str, Any, Callable[[], None]]]:
        """(name, view of the whole tensor in the file's map, drop its pages) per tensor."""
        for file, header in self.headers.items():
            mapped = map_file(file)
            for name, src in sorted(header.items(), key=lambda item: item[1].offset):
                yield name, view_of(mapped, src), _dropper(mapped, src)

    def broadcasts(self, wanted: Callable[[str], bool]) -> Iterator[tuple[str, Any]]:
        """(name, whole tensor) per tensor of the torch files, broadcast from rank 0."""
        import torch
        import torch.distributed as dist

        stream = self.torch.stream() if self.torch is not None else None
        for name, shape, dtype in self.broadcast:
            mine = next(stream)[1] if stream is not None else None
            if not wanted(name):
                continue
            if mine is not None:
                buffer = mine.to(self.home).contiguous()
            else:
                buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=self.home)
            dist.broadcast(buffer, src=0)
            yield name, buffer
            del buffer


def _open_on_rank_0(files: Sequence[str]) -> tuple[CheckpointReader | None,
                                                   list[tuple[str, tuple[int, ...], str]]]:
    """Rank 0's reader of the torch files, and (name, shape, dtype) of each, on every rank.

    A file rank 0 refuses (unsafe, corrupt) is refused on every rank with rank 0's message,
    so that no rank waits for a broadcast that never comes.
    """
    import torch.distributed as dist

    reader, listed, failure = None, [], None
    if dist.get_rank() == 0:
        try:
            reader = CheckpointReader(files)
            listed = [(name, tuple(t.shape), dtype_name(t.dtype))
                      for file in files for name, t in reader.torch[file].items()]
        except CheckpointError as exc:
            failure = str(exc)
    message: list[Any] = [(listed, failure)]
    dist.broadcast_object_list(message, src=0)
    listed, failure = message[0]
    if failure is not None:
        raise CheckpointError(failure)
    return reader, listed


def _dropper(mapped: Any, src: OffloadSource) -> Callable[[], None]:
    return lambda: drop_pages(mapped, src)


def sharded_reader(model: Any, files: Sequence[str], device_map: Any,
                   offload_folder: Any) -> ShardedReader | None:
    """A `ShardedReader` when ``model`` holds DTensor parameters, else None.

    Raises:
        CheckpointError: ``device_map`` or ``offload_folder`` given for such a model.

    Effects: as `ShardedReader` (a broadcast from rank 0 for torch-format files).
    """
    if not is_sharded(model):
        return None
    given = [f"{name}={value!r}" for name, value in (("device_map", device_map),
                                                     ("offload_folder", offload_folder))
             if value is not None]
    if given:
        msg = (f"load_checkpoint(): device_map and offload_folder must be None for a model "
               f"whose parameters are DTensors (sharded by dl.wrap), but got "
               f"{', '.join(given)}. Each rank loads its own shards onto the mesh's device; "
               "drop the argument, or load before wrapping for dispatch.")
        raise CheckpointError(msg)
    return ShardedReader(files, _home_device(model))


def _destination(current: Any, target: Any, home: Any, call: str,
                 name: str) -> tuple[Any, tuple[Runs, ...], bool]:
    """(the local tensor to write, the runs it holds, whether it is ``current``'s own)."""
    import torch

    if isinstance(current, _dtensor_type()):
        runs = _local_runs(current, call)
        own = current._local_tensor
    else:
        runs = tuple(((0, size),) if size else () for size in current.shape)
        own = current
    shape = tuple(sum(end - begin for begin, end in dim) for dim in runs)
    if shape != tuple(own.shape):
        msg = (f"{call}: the shard of {name!r} this rank holds must be the one its placements "
               f"{current.placements} describe, but got local shape {tuple(own.shape)} where "
               f"they give {shape}. This layout is not supported; load before wrapping.")
        raise CheckpointError(msg)
    if not own.is_meta and own.dtype == target:
        return own, runs, True
    if not own.is_meta and isinstance(current, _dtensor_type()):
        msg = (f"{call}: dtype must be the dtype of an already materialised sharded parameter "
               f"({name!r} is {current.dtype}), but got {target}. Load into the model built "
               "under init_empty_weights (still on the meta device), or drop dtype.")
        raise CheckpointError(msg)
    device = home if own.is_meta else own.device
    return torch.empty(shape, dtype=target, device=device), runs, False


def _put(model: Any, names: Sequence[str], current: Any, local: Any) -> None:
    """Give ``current`` (under each of ``names``) the values of ``local``, keeping its object.

    A parameter keeps its identity (an optimizer built before the load still holds it): its
    contents are swapped with a new parameter's (`torch.utils.swap_tensors`), as
    ``Module.to_empty`` does for FSDP2's DTensors. Buffers are replaced under each name.
    """
    import torch
    from torch.distributed.tensor import DTensor

    value = local
    if isinstance(current, DTensor):
        value = DTensor.from_local(local, current.device_mesh, current.placements,
                                   run_check=False, shape=current.shape, stride=current.stride())
    if isinstance(current, torch.nn.Parameter):
        fresh = torch.nn.Parameter(value, requires_grad=current.requires_grad)
        fresh.__dict__.update(current.__dict__)
        torch.utils.swap_tensors(current, fresh)  # type: ignore[no-untyped-call]
        return
    for name in names:
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = value


def _copy_in(model: Any, names: Sequence[str], current: Any, whole: Any, target: Any,
             home: Any) -> None:
    """Copy this rank's part of ``whole`` (the full tensor) into ``current``'s shard."""
    import torch

    local, runs, own = _destination(current, target, home, "load_checkpoint()", names[0])
    with torch.no_grad():
        for src, dst in _boxes(runs):
            local[dst].copy_(whole[src])
    if not own:
        _put(model, names, current, local)


def stream_shards(model: Any, reader: ShardedReader, expected: Mapping[str, Any],
                  groups: Mapping[str, tuple[str, ...]], dmap: Any, dtype: Any,
                  keep: Sequence[str], folder: Any, done: Callable[[int], Any], copy: bool, *,
                  target_dtype: Callable[..., Any]) -> None:
    """Fill each tensor of ``model`` that the checkpoint holds with this rank's slices of it.

    Safetensors tensors are read from private memory maps, only the bytes of this rank's
    boxes, and the map's pages are dropped after each tensor; torch-format tensors arrive
    whole from rank 0 (a broadcast each), are sliced and let go. Meta tensors get storage on
    the mesh's device; real ones are written in place. Arguments as `load_checkpoint`'s
    streaming (``dmap`` and ``folder`` are None, `sharded_reader` refused them; ``copy`` is
    moot: shards are always copies); ``target_dtype(name, current, source, dtype, keep)``
    is its dtype rule.

    Effects: sets the model's parameters (in place, keeping each object) and buffers; reads
    the files; on torch-format files, one broadcast per tensor over the default group.
    """
    def load(name: str, whole: Any) -> None:
        current = expected[name]
        target = target_dtype(name, current.dtype, whole.dtype, dtype, keep)
        _copy_in(model, groups.get(name, (name,)), current, whole, target, reader.home)

    for name, view, drop in reader.safetensors():
        if name in expected:
            load(name, view)
        drop()
        done(view.numel() * view.element_size())
    for name, whole in reader.broadcasts(lambda n: n in expected):
        load(name, whole)
        done(whole.numel() * whole.element_size())
