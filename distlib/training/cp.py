"""Context parallelism on the mesh's ``cp`` axis: the sequence of one batch split over ranks.

`context_parallel` wraps torch's ``torch.distributed.tensor.experimental.context_parallel``
(ring attention under ``scaled_dot_product_attention``, load-balanced shards as torch does).
torch runs it on CUDA only: on a CPU Env with ``cp > 1`` distlib refuses it (`check_cp`), at
``wrap`` and here, instead of failing deep inside the first attention call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch.distributed.tensor.experimental import context_parallel as torch_cp

from distlib.env import Env
from distlib.errors import StrategyError
from distlib.runtime import device_mesh

__all__ = ["check_cp", "context_parallel"]


def check_cp(env: Env, call: str = "wrap()") -> None:
    """Refuse ``cp > 1`` where torch's context parallelism cannot run (not on CUDA).

    Raises:
        StrategyError: ``env.mesh.cp > 1`` on a device other than CUDA.

    Examples:
        >>> from distlib.topology import Mesh
        >>> check_cp(Env(world_size=2, rank=0, local_world_size=2, mesh=Mesh(cp=2)))
        Traceback (most recent call last):
        ...
        distlib.errors.StrategyError: wrap(): context parallelism (cp > 1) must run on CUDA ...
    """
    if env.mesh.cp > 1 and env.torch_device.type != "cuda":
        msg = (f"{call}: context parallelism (cp > 1) must run on CUDA devices, but got "
               f"cp={env.mesh.cp} on device {env.device!r}. torch's context_parallel has ring "
               "attention kernels for CUDA only (scaled_dot_product_attention on CPU has no "
               "sharding rule in torch 2.13); put those ranks on dp_shard or tp on CPU.")
        raise StrategyError(msg)


@contextlib.contextmanager
def context_parallel(env: Env, buffers: Sequence[torch.Tensor], seq_dims: Sequence[int], *,
                     no_restore_buffers: Sequence[torch.Tensor] = ()) -> Iterator[None]:
    """Split ``buffers`` along their sequence dims over the ``cp`` ranks for the block.

    Run the forward and backward inside the block; every rank of a cp group must hold the
    same full batch (``dl.shard`` deals batches by the data-parallel coordinate). With
    ``cp == 1`` the block runs unchanged, so one loop serves every mesh.

    Args:
        env: the Env (its ``mesh.cp`` is the number of ranks sharing the sequence).
        buffers: tensors with a sequence dimension (input ids, labels, position ids, rotary
            caches); each is sharded in place for the block and restored after it.
        seq_dims: the sequence dimension of each buffer, in the same order.
        no_restore_buffers: buffers among ``buffers`` not to restore afterwards (e.g. the
            inputs, not needed again).

    Raises:
        StrategyError: ``buffers`` and ``seq_dims`` differ in length; cp > 1 off CUDA.

    Effects: with cp > 1, builds the device mesh on first use; shards the buffers in place and
    makes ``scaled_dot_product_attention`` run ring attention over the cp ranks in the block.
    """
    if len(buffers) != len(seq_dims):
        msg = (f"context_parallel(): seq_dims must give one dimension per buffer, but got "
               f"{len(buffers)} buffer(s) and seq_dims={list(seq_dims)}. Pass e.g. "
               "buffers=[input_ids, labels], seq_dims=[1, 1].")
        raise StrategyError(msg)
    if env.mesh.cp == 1:
        yield
        return
    check_cp(env, "context_parallel()")
    with torch_cp(device_mesh(env)["cp"], buffers=list(buffers),
                  buffer_seq_dims=list(seq_dims), no_restore_buffers=set(no_restore_buffers)):
        yield
