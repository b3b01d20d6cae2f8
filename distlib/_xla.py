"""torch_xla behind small functions: device, ranks, SPMD mesh, loader, collectives, CPU copies.

The one module below the XLA applier that talks to torch_xla; `detect()`, the data, collectives
and checkpoint code and the applier (``distlib.training.xla``) call these instead of importing
torch_xla themselves. torch_xla is imported
inside each function (it writes ``XLA_FLAGS`` and ``PJRT_DYNAMIC_PLUGINS`` into ``os.environ``
when imported, which must not happen on ``import distlib``).

Facts these functions rely on (evidence in docs/tpu.md): on the CPU client one process drives
all ``CPU_NUM_DEVICES`` devices; replicas started by ``xmp.spawn`` there are threads whose rank
is known only to the runtime; collectives between such replicas, or between torchrun processes,
never complete on the CPU client, while an SPMD program over a device mesh does.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from distlib._tree import map_tree
from distlib.errors import CollectiveError, StrategyError

__all__ = [
    "all_gather", "all_reduce", "barrier", "broadcast", "data_mesh", "device", "device_batches",
    "device_loader", "is_available", "is_spmd", "modules", "num_devices", "runtime_ranks",
    "shard_batch", "sync", "to_cpu",
]

_INSTALL = ("Install it with `pip install torch==2.9.0 torch_xla==2.9.0` (the versions must "
            "match), and set PJRT_DEVICE=TPU on a TPU VM or PJRT_DEVICE=CPU to try it on a CPU.")
_REDUCE_OPS = ("sum", "mean", "max", "min")


def is_available() -> bool:
    """True when torch_xla can be imported (checked without importing it).

    Examples:
        >>> isinstance(is_available(), bool)
        True
    """
    return importlib.util.find_spec("torch_xla") is not None


def modules(call: str) -> tuple[Any, Any, Any]:
    """``(torch_xla, xla_model, runtime)``, or a StrategyError naming ``call``."""
    if not is_available():
        msg = f"{call}: torch_xla must be installed, but got no module named 'torch_xla'. {_INSTALL}"
        raise StrategyError(msg)
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.runtime as xr

    return torch_xla, xm, xr


def device() -> torch.device:
    """This replica's XLA device (``xla:0`` in each TPU process, ``xla:i`` in thread i on CPU).

    Effects: starts the PJRT runtime on first use. Under SPMD ``torch_xla.device()`` alone
    does not start it (the virtual device needs no client), and a backward before the client
    exists fails inside autograd; asking for the device count starts it.
    """
    torch_xla, _, xr = modules("device()")
    xr.global_runtime_device_count()
    return torch_xla.device()  # type: ignore[no-any-return]


def runtime_ranks() -> dict[str, int]:
    """The rank fields as the XLA runtime sees this replica (what `detect()` needs under xmp).

    Under ``xmp.spawn`` the rank of a replica is not in the environment (on the CPU client and
    on TPU v2/v3 replicas are threads of one process), so it is asked from the runtime. Under
    SPMD one process drives every device and is rank 0 of 1.

    Returns:
        ``rank``, ``world_size``, ``local_rank``, ``local_world_size``, ``node_rank``,
        ``num_nodes`` as ints.

    Effects: starts the PJRT runtime on first use.
    """
    _, _, xr = modules("runtime_ranks()")
    world = int(xr.world_size())
    if world == 1:
        return {"rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1,
                "node_rank": 0, "num_nodes": 1}
    local_world = int(xr.local_device_count())
    return {"rank": int(xr.global_ordinal()), "world_size": world,
            "local_rank": int(xr.local_ordinal()), "local_world_size": local_world,
            "node_rank": int(xr.host_index()), "num_nodes": -(-world // local_world)}


def is_spmd() -> bool:
    """True when torch_xla runs in SPMD mode (``XLA_USE_SPMD=1`` or ``use_spmd()`` was called)."""
    _, _, xr = modules("is_spmd()")
    return bool(xr.is_spmd())


def num_devices() -> int:
    """How many runtime devices the job has in all (the size of an SPMD mesh).

    Effects: starts the PJRT runtime on first use.
    """
    _, _, xr = modules("num_devices()")
    return int(xr.global_runtime_device_count())


def data_mesh(num: int | None = None) -> Any:
    """A one-axis SPMD mesh named ``"data"`` over the first ``num`` devices (default: all)."""
    import numpy as np

    modules("data_mesh()")
    import torch_xla.distributed.spmd as xs

    count = num_devices() if num is None else num
    if count < 1 or count > num_devices():
        msg = (f"data_mesh(): num must be in 1..{num_devices()}, but got {count!r}. Set "
               "CPU_NUM_DEVICES (CPU client) before the first XLA call to get more devices.")
        raise StrategyError(msg)
    return xs.Mesh(np.arange(count), (count,), ("data",))


def shard_batch(batch: Any, mesh: Any) -> Any:
    """Mark every tensor of a nested batch as split along dim 0 over the mesh's data axis.

    Tensors are moved to the XLA device first; non-tensors pass through. Returns a new
    structure (the caller's is not changed).

    Raises:
        StrategyError: not in SPMD mode, or a dim 0 the mesh size does not divide.

    Effects: moves tensors to the device; records a sharding annotation on each.
    """
    modules("shard_batch()")
    import torch_xla.distributed.spmd as xs

    if not is_spmd():
        msg = ("shard_batch(): SPMD mode must be on, but got XLA_USE_SPMD unset. Launch with "
               "XLA_USE_SPMD=1 (or call torch_xla.runtime.use_spmd() first in the script).")
        raise StrategyError(msg)
    size = int(mesh.size())
    target = device()

    def mark(x: Any) -> Any:
        if x.dim() == 0 or x.shape[0] % size:
            msg = (f"shard_batch(): dim 0 of every tensor must be a multiple of the mesh size "
                   f"{size}, but got shape {tuple(x.shape)}. Use a batch size divisible by "
                   f"{size} (drop_last=True).")
            raise StrategyError(msg)
        x = x.to(target)
        xs.mark_sharding(x, mesh, ("data",) + (None,) * (x.dim() - 1))
        return x

    return map_tree(mark, batch)


def sync() -> None:
    """Cut the lazy graph here and run it (``torch_xla.sync()``).

    Effects: compiles (first time) and executes the pending XLA computation.
    """
    torch_xla, _, _ = modules("sync()")
    torch_xla.sync()


def device_loader(loader: Iterable[Any], target: Any = None, *, mesh: Any = None) -> Any:
    """torch_xla's ``MpDeviceLoader`` over ``loader``: batches arrive on the XLA device.

    Each ``next()`` also cuts the graph. With a ``mesh`` (SPMD) the batches arrive split along
    dim 0 over its data axis.
    """
    modules("device_loader()")
    import torch_xla.distributed.parallel_loader as pl

    kwargs: dict[str, Any] = {}
    if mesh is not None:
        import torch_xla.distributed.spmd as xs

        kwargs["input_sharding"] = xs.ShardingSpec(mesh, ("data", None))
    return pl.MpDeviceLoader(loader, target if target is not None else device(), **kwargs)


def device_batches(batches: Iterable[Any], *, mesh: Any = None) -> Iterator[Any]:
    """Iterate ``batches`` through `device_loader`; stop its threads when the caller stops.

    The parallel loader reads ahead in its own threads; a caller that leaves the loop early
    (a step budget reached mid-epoch) would leave them blocked on a full queue. Closing the
    generator closes the loader and joins its threads.

    Effects: starts torch_xla's loader threads for the pass; copies batches to the device.
    """
    loader = device_loader(batches, mesh=mesh)
    try:
        yield from loader
    finally:
        parallel = getattr(loader, "_parallel_loader", None)
        if parallel is not None:
            parallel.close()


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce a tensor over all replicas (``xm.all_reduce``); returns a new tensor.

    Raises:
        CollectiveError: an unknown op.
    """
    _, xm, xr = modules("all_reduce()")
    if op not in _REDUCE_OPS:
        msg = f"all_reduce(): op must be one of {', '.join(map(repr, _REDUCE_OPS))}, but got {op!r}."
        raise CollectiveError(msg)
    kind = {"sum": xm.REDUCE_SUM, "mean": xm.REDUCE_SUM, "max": xm.REDUCE_MAX,
            "min": xm.REDUCE_MIN}[op]
    scale = 1.0 / xr.world_size() if op == "mean" else 1.0
    return xm.all_reduce(kind, x, scale=scale)  # type: ignore[no-any-return]


def all_gather(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every replica's tensor along ``dim`` (``xm.all_gather``)."""
    _, xm, _ = modules("all_gather()")
    return xm.all_gather(x, dim=dim)  # type: ignore[no-any-return]


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Every replica gets replica ``src``'s tensor (``xm.collective_broadcast``, in place)."""
    _, xm, _ = modules("broadcast()")
    xm.collective_broadcast([x], root_ordinal=src)
    return x


def barrier(tag: str) -> None:
    """Wait until every replica reaches the barrier named ``tag`` (``xm.rendezvous``).

    Effects: blocks this replica; cuts the graph first so pending work is not reordered.
    """
    _, xm, _ = modules("barrier()")
    sync()
    xm.rendezvous(tag)


def to_cpu(obj: Any) -> Any:
    """Copy every XLA tensor of a nested structure to the CPU (before saving, for example).

    Examples:
        >>> to_cpu({"a": [torch.ones(1)], "b": 3})
        {'a': [tensor([1.])], 'b': 3}
    """
    return map_tree(lambda t: t.cpu() if t.device.type == "xla" else t, obj)
