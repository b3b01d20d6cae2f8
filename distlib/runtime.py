"""Joining and leaving the process group, and setting the device: the only place that does.

Effectful functions (collectives, ``wrap``, checkpoints) call `initialize` on first need; it is
idempotent. An existing group that disagrees with the Env is an error, never a hang.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from distlib.env import Env
from distlib.errors import RuntimeStateError
from distlib.topology import AXES, DATA_AXES, Mesh

__all__ = ["data_group", "device_mesh", "initialize", "is_initialized", "process_group",
           "shutdown"]

# The DeviceMesh (and data-parallel group) of each Mesh this process has built, so that each
# mesh's sub-groups are made once (making a group is a collective over every rank). This mirrors torch's own process-wide
# group registry and is emptied with it by `shutdown`; it is the only such table in distlib.
_MESHES: dict[tuple[Mesh, str], Any] = {}


def is_initialized() -> bool:
    """True when this process is in a default process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _check_agrees(env: Env) -> None:
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    backend = str(dist.get_backend()).lower()
    if (rank, world_size) != (env.rank, env.world_size):
        msg = (
            f"initialize(): the Env must match the process group already joined, but got "
            f"Env(rank={env.rank}, world_size={env.world_size}) and a group with "
            f"rank={rank}, world_size={world_size}. Build the Env with detect() in the process "
            "that joined, or call distlib.runtime.shutdown() first."
        )
        raise RuntimeStateError(msg)
    if env.backend not in backend:
        msg = (
            f"initialize(): the Env's backend must match the process group already joined, but "
            f"got Env(backend={str(env.backend)!r}) and a group with backend {backend!r}. "
            "Use the same device kind in both, or shut the group down first."
        )
        raise RuntimeStateError(msg)


def _set_device(env: Env) -> None:
    if env.device.startswith("cuda"):
        import torch

        torch.cuda.set_device(env.torch_device)


def initialize(env: Env, *, timeout_s: float | None = None) -> None:
    """Join the process group the Env describes and select its device, once.

    Single-process Envs join nothing. A second call with an agreeing Env does nothing.

    Args:
        env: the Env of this process.
        timeout_s: how long collectives and the rendezvous may wait (default ``env.timeout_s``).

    Raises:
        RuntimeStateError: a process group is already joined with other ranks or backend.

    Effects: may create a TCP store connection and the default process group; sets the CUDA
    device on GPU Envs.
    """
    _set_device(env)
    if env.backend == "xla" or not env.is_distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        _check_agrees(env)
        return
    timeout = timedelta(seconds=timeout_s if timeout_s is not None else env.timeout_s)
    store: Any = dist.TCPStore(  # type: ignore[attr-defined]
        host_name=env.master_addr,
        port=env.master_port,
        world_size=env.world_size,
        is_master=env.rank == 0 and not env.agent_store,
        timeout=timeout,
        multi_tenant=not env.agent_store,
    )
    # Keys of an earlier attempt (after --max-restarts) must not leak into this one: the
    # agent's store outlives attempts, so prefix by attempt like torch's env:// path does.
    prefix = "/worker" if env.agent_store else "/distlib"
    store = dist.PrefixStore(  # type: ignore[attr-defined]
        f"{prefix}/attempt_{env.restart_count}", store)
    kwargs: dict[str, Any] = {}
    if env.backend == "nccl":
        kwargs["device_id"] = env.torch_device
    dist.init_process_group(
        backend=env.backend, store=store, rank=env.rank, world_size=env.world_size,
        timeout=timeout, **kwargs,
    )


def shutdown() -> None:
    """Leave the default process group if this process is in one.

    Effects: destroys the default process group.
    """
    _MESHES.clear()
    if is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def device_mesh(env: Env) -> Any:
    """torch's ``DeviceMesh`` for ``env.mesh``, its dimensions named as the Mesh's axes.

    Built once per mesh in this process (every rank must call it, in the same order, the first
    time: making its sub-groups is a collective), and forgotten by `shutdown`.

    Effects: joins the process group (`initialize`); creates the mesh's sub-groups once.
    """
    from torch.distributed.device_mesh import init_device_mesh

    initialize(env)
    device_type = env.torch_device.type
    key = (env.mesh, device_type)
    if key not in _MESHES:
        sizes = tuple(env.mesh.sizes[a] for a in AXES)
        _MESHES[key] = init_device_mesh(device_type, sizes, mesh_dim_names=AXES)
    return _MESHES[key]


def data_group(env: Env) -> Any:
    """The process group of this rank's data-parallel peers (None: the whole world).

    Ranks of one tp/cp group read the same batches, so data collectives (`gather_metrics`,
    `reduce` of a metric, the loader's agreement) run over the ranks that share this rank's
    ``cp`` and ``tp`` coordinates. With ``cp == tp == 1`` that is every rank: None, the default
    group, and nothing is built.

    Effects: as `device_mesh` the first time a mesh with ``cp`` or ``tp`` > 1 is used.
    """
    if env.mesh.is_data_parallel_only or not env.is_distributed:
        return None
    import torch.distributed as dist

    initialize(env)
    key = (env.mesh, "data")
    if key not in _MESHES:
        groups = [list(g) for g in env.mesh.groups(DATA_AXES)]
        mine, _ = dist.new_subgroups_by_enumeration(groups)  # type: ignore[no-untyped-call]
        _MESHES[key] = mine
    return _MESHES[key]


@contextlib.contextmanager
def process_group(env: Env, *, timeout_s: float | None = None) -> Iterator[Env]:
    """Join the group for the body of a ``with`` block and always leave it, also on error.

    Examples:
        >>> with process_group(Env()) as env:
        ...     env.world_size
        1

    Effects: as `initialize` on entry, `shutdown` on exit (only if this block joined).
    """
    joined_here = not is_initialized()
    initialize(env, timeout_s=timeout_s)
    try:
        yield env
    finally:
        if joined_here:
            shutdown()
