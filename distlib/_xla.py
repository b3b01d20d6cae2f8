"""torch_xla behind small functions: device, ranks, SPMD mesh, loader, collectives, placement.

The one module that talks to torch_xla; the XLA strategy, and later the data, collectives and
checkpoint code, call these instead of importing torch_xla themselves. torch_xla is imported
inside each function (it writes ``XLA_FLAGS`` and ``PJRT_DYNAMIC_PLUGINS`` into ``os.environ``
when imported, which must not happen on ``import distlib``).

Facts these functions rely on (evidence in docs/tpu.md): on the CPU client one process drives
all ``CPU_NUM_DEVICES`` devices; replicas started by ``xmp.spawn`` there are threads whose rank
is known only to the runtime; collectives between such replicas, or between torchrun processes,
never complete on the CPU client, while an SPMD program over a device mesh does.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from distlib.errors import CollectiveError, PrecisionError, StrategyError
from distlib.strategies._handle import DelegatingOptimizer

__all__ = [
    "XLAOptimizer", "all_gather", "all_reduce", "barrier", "broadcast", "check_autograd",
    "check_precision", "check_replicas", "data_mesh", "device", "device_batches", "device_loader",
    "is_available", "is_spmd", "num_devices", "place", "rebind_optimizer", "runtime_ranks",
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


def _modules(call: str) -> tuple[Any, Any, Any]:
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
    torch_xla, _, xr = _modules("device()")
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
    _, _, xr = _modules("runtime_ranks()")
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
    _, _, xr = _modules("is_spmd()")
    return bool(xr.is_spmd())


def num_devices() -> int:
    """How many runtime devices the job has in all (the size of an SPMD mesh).

    Effects: starts the PJRT runtime on first use.
    """
    _, _, xr = _modules("num_devices()")
    return int(xr.global_runtime_device_count())


def data_mesh(num: int | None = None) -> Any:
    """A one-axis SPMD mesh named ``"data"`` over the first ``num`` devices (default: all)."""
    import numpy as np

    _modules("data_mesh()")
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
    _modules("shard_batch()")
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

    return _map_tensors(batch, mark)


def sync() -> None:
    """Cut the lazy graph here and run it (``torch_xla.sync()``).

    Effects: compiles (first time) and executes the pending XLA computation.
    """
    torch_xla, _, _ = _modules("sync()")
    torch_xla.sync()


def device_loader(loader: Iterable[Any], target: Any = None, *, mesh: Any = None) -> Any:
    """torch_xla's ``MpDeviceLoader`` over ``loader``: batches arrive on the XLA device.

    Each ``next()`` also cuts the graph. With a ``mesh`` (SPMD) the batches arrive split along
    dim 0 over its data axis.
    """
    _modules("device_loader()")
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
    _, xm, xr = _modules("all_reduce()")
    if op not in _REDUCE_OPS:
        msg = f"all_reduce(): op must be one of {', '.join(map(repr, _REDUCE_OPS))}, but got {op!r}."
        raise CollectiveError(msg)
    kind = {"sum": xm.REDUCE_SUM, "mean": xm.REDUCE_SUM, "max": xm.REDUCE_MAX,
            "min": xm.REDUCE_MIN}[op]
    scale = 1.0 / xr.world_size() if op == "mean" else 1.0
    return xm.all_reduce(kind, x, scale=scale)  # type: ignore[no-any-return]


def all_gather(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every replica's tensor along ``dim`` (``xm.all_gather``)."""
    _, xm, _ = _modules("all_gather()")
    return xm.all_gather(x, dim=dim)  # type: ignore[no-any-return]


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Every replica gets replica ``src``'s tensor (``xm.collective_broadcast``, in place)."""
    _, xm, _ = _modules("broadcast()")
    xm.collective_broadcast([x], root_ordinal=src)
    return x


def barrier(tag: str) -> None:
    """Wait until every replica reaches the barrier named ``tag`` (``xm.rendezvous``).

    Effects: blocks this replica; cuts the graph first so pending work is not reordered.
    """
    _, xm, _ = _modules("barrier()")
    sync()
    xm.rendezvous(tag)


def to_cpu(obj: Any) -> Any:
    """Copy every XLA tensor of a nested structure to the CPU (before saving, for example).

    Examples:
        >>> to_cpu({"a": [torch.ones(1)], "b": 3})
        {'a': [tensor([1.])], 'b': 3}
    """
    return _map_tensors(obj, lambda t: t.cpu() if t.device.type == "xla" else t)


def check_replicas(env: Any, *, spmd: bool) -> None:
    """Refuse the replica layouts whose collectives cannot complete on the CPU client.

    On ``PJRT_DEVICE=CPU`` several processes (torchrun) each see a world of one device, and
    several xmp replicas compile one module each whose collectives never meet (the
    rendezvous aborts after 10 s): pytorch/xla#5005 and #9089. SPMD is not affected.

    Raises:
        StrategyError: CPU client with more than one replica outside SPMD.
    """
    _, _, xr = _modules("apply()")
    if spmd or xr.device_type() != "CPU":
        return
    replicas = max(int(env.world_size), int(xr.world_size()))
    if replicas > 1:
        msg = (f"apply(): XLA on the CPU client must run as one replica, but got {replicas} "
               f"replicas (world_size={env.world_size}, torch_xla world_size={xr.world_size()}). "
               "Its collectives never complete there (pytorch/xla#9089). Use XLA(spmd=True) "
               "with CPU_NUM_DEVICES=N and XLA_USE_SPMD=1 for several CPU devices, or a TPU.")
        raise StrategyError(msg)


def check_autograd(target: torch.device) -> None:
    """Fail now, clearly, if autograd cannot run on the XLA device in this process.

    torch's autograd engine sizes its per-device queues at its first backward; a backward that
    ran on the CPU before the XLA runtime started leaves no queue for the XLA device, and every
    later XLA backward dies with an internal assert. A scalar backward here finds that out.

    Raises:
        StrategyError: a backward ran before the XLA runtime started.
    """
    probe = torch.zeros((), device=target, requires_grad=True)
    try:
        (probe * 1.0).backward()  # type: ignore[no-untyped-call]
    except RuntimeError as exc:
        if "device_ready_queues_" not in str(exc):
            raise
        msg = ("apply(): the XLA runtime must start before the first backward of the process, "
               "but got a backward that ran earlier (autograd then has no queue for the XLA "
               "device). Call distlib.detect() or wrap() before any backward on the CPU.")
        raise StrategyError(msg) from None


def check_precision(precision: Any) -> torch.dtype | None:
    """The autocast dtype for a precision under XLA: None for ``"no"``, bf16 for ``"bf16"``.

    Raises:
        PrecisionError: fp16 or fp8 (TPUs compute in bf16; there is no fp16 grad scaling here).

    Examples:
        >>> check_precision("bf16")
        torch.bfloat16
    """
    value = getattr(precision, "value", precision)
    if value == "no":
        return None
    if value == "bf16":
        return torch.bfloat16
    msg = (f"apply(): precision under XLA must be 'no' or 'bf16', but got {value!r}. TPUs "
           "compute in bfloat16; use --precision bf16.")
    raise PrecisionError(msg)


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return type(obj)({k: _map_tensors(v, fn) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def place(model: torch.nn.Module, target: torch.device) -> dict[int, torch.nn.Parameter]:
    """Move a module's parameters and buffers to an XLA device, keeping tied weights tied.

    ``module.to("xla")`` cannot swap tensor data in place across devices, so it makes new
    Parameters, and makes two for a weight shared by two modules (the tie is lost). This
    makes one new Parameter per distinct old one.

    Returns:
        ``{id(old parameter): new parameter}``, to rebind an optimizer.

    Effects: replaces the parameters and buffers of ``model`` (and its submodules) in place.
    """
    new_params: dict[int, torch.nn.Parameter] = {}
    new_buffers: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in new_params:
                moved = torch.nn.Parameter(param.detach().to(target),
                                           requires_grad=param.requires_grad)
                moved.__dict__.update(param.__dict__)
                if param.grad is not None:
                    moved.grad = param.grad.to(target)
                new_params[id(param)] = moved
            module._parameters[name] = new_params[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                new_buffers.setdefault(id(buffer), buffer.to(target))
                module._buffers[name] = new_buffers[id(buffer)]
    return new_params


def rebind_optimizer(optimizer: torch.optim.Optimizer,
                     mapping: Mapping[int, torch.nn.Parameter], target: torch.device) -> None:
    """Point an optimizer at the moved parameters; move any state it already holds.

    Raises:
        StrategyError: the optimizer holds a parameter that is not the model's.

    Effects: rewrites ``optimizer.param_groups`` and ``optimizer.state`` in place.
    """
    for index, group in enumerate(optimizer.param_groups):
        missing = [tuple(p.shape) for p in group["params"] if id(p) not in mapping]
        if missing:
            msg = (f"apply(): the optimizer must only hold the model's parameters, but got "
                   f"param group {index} with {len(missing)} others (shapes {missing[:3]}). "
                   "Build the optimizer from model.parameters() of the model you wrap.")
            raise StrategyError(msg)
    state: dict[torch.Tensor, Any] = {mapping[id(p)]: _map_tensors(s, lambda t: t.to(target))
             for p, s in optimizer.state.items() if id(p) in mapping}
    for group in optimizer.param_groups:
        group["params"] = [mapping[id(p)] for p in group["params"]]
    optimizer.state.clear()
    optimizer.state.update(state)


class XLAOptimizer(DelegatingOptimizer):
    """The user's optimizer whose ``step()`` is torch_xla's ``xm.optimizer_step``.

    ``step()`` all-reduces (averages) the gradients when the runtime has several replicas,
    steps the wrapped optimizer and, with ``sync=True``, cuts and runs the graph. Under SPMD
    the partitioner has already reduced the gradients and torch_xla's world size is 1.
    Everything else (``param_groups``, ``state``, ``state_dict``) is the wrapped optimizer's.
    """

    _OWN = ("optimizer", "sync", "__setstate__")

    def __init__(self, optimizer: torch.optim.Optimizer, *, sync: bool = True) -> None:
        super().__init__(optimizer)
        self.sync = sync

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Reduce gradients across replicas, step, and cut the graph (when ``sync``)."""
        _, xm, _ = _modules("optimizer.step()")
        args = {} if closure is None else {"closure": closure}
        return xm.optimizer_step(self.optimizer, barrier=self.sync, optimizer_args=args)

    def __repr__(self) -> str:
        return f"XLAOptimizer({self.optimizer!r}, sync={self.sync})"
