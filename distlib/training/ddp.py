"""The `DDP` applier: torch's DistributedDataParallel, and its step-time behaviour."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from distlib.env import Env
from distlib.errors import StrategyError
from distlib.precision import AutocastForward, compute_dtype
from distlib.runtime import initialize, is_initialized
from distlib.strategies.ddp import DDP
from distlib.strategies.single import Single
from distlib.training import single
from distlib.training.accumulation import MicroStep
from distlib.training.single import SingleWrapped, place_with_precision

__all__ = ["DDPWrapped", "apply"]


class DDPWrapped(SingleWrapped):
    """A model inside ``DistributedDataParallel``: gradients sync only on ``micro.sync``.

    Attributes:
        ddp: the ``DistributedDataParallel`` wrapper (what ``wrap`` returned).
    """

    def __init__(self, *, strategy: DDP, env: Env, module: torch.nn.Module,
                 ddp: DistributedDataParallel, scaler: Any = None) -> None:
        super().__init__(strategy=strategy, env=env, module=module, scaler=scaler, wrapper=ddp)
        self.ddp = ddp

    def backward(self, loss: torch.Tensor, micro: MicroStep | None) -> None:
        """Backward with DDP's all-reduce on sync steps only (``no_sync`` elsewhere).

        DDP decides in its forward whether the next backward syncs; the previous batch set
        that from ``micro.next_sync``. A sync step whose forward ran unprepared (a window's
        size that was not known ahead) averages the gradients by hand.
        """
        sync = micro is None or micro.sync
        scaled = self.scale(loss)
        prepared = self.ddp.require_forward_param_sync
        scaled.backward()  # type: ignore[no-untyped-call]
        if sync and not prepared:
            _allreduce(self.ddp)
        self.ddp.require_backward_grad_sync = micro is None or micro.next_sync

    def release(self) -> None:
        super().release()
        self.ddp = None  # type: ignore[assignment]


def _allreduce(ddp: DistributedDataParallel) -> None:
    """Average gradients by hand when the forward ran without DDP's sync preparation."""
    world = dist.get_world_size()
    for p in ddp.module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _register_comm_hook(ddp: DistributedDataParallel, name: str) -> None:
    if name == "none":
        return
    if name == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    else:
        hook = {"fp16": default_hooks.fp16_compress_hook,
                "bf16": default_hooks.bf16_compress_hook}[name]
        ddp.register_comm_hook(None, hook)  # type: ignore[arg-type]


def apply(model: torch.nn.Module, strategy: DDP, env: Env, *, optimizer: Any = None,
          scheduler: Any = None) -> tuple[Any, Any, Any]:
    """Wrap the model in ``DistributedDataParallel`` with the strategy's options.

    In one process with no process group joined there is nothing to synchronise: the model is
    only placed, as `Single` does.

    Returns:
        ``(ddp_model, optimizer, scheduler)``; the optimizer steps through a ``GradScaler``
        under fp16.

    Raises:
        StrategyError: ``comm_hook="bf16"`` outside NCCL.

    Effects: joins the process group (`distlib.runtime.initialize`); moves ``model`` to the
    Env's device in place; DDP broadcasts rank 0's parameters and buffers to every rank.
    """
    initialize(env)
    if not is_initialized():
        return single.apply(model, Single(), env, optimizer=optimizer, scheduler=scheduler)
    if strategy.comm_hook == "bf16" and env.backend != "nccl":
        msg = (f"wrap(): DDP comm_hook 'bf16' must run on the NCCL backend, but got backend "
               f"{str(env.backend)!r}. Use comm_hook='fp16' (or 'powersgd') on gloo.")
        raise StrategyError(msg)
    scaler = place_with_precision(model, env, autocast=False)
    device = env.torch_device
    # torch >= 2.13 deprecates the argument with a warning: pass it only to turn it off.
    extra: dict[str, Any] = {} if strategy.broadcast_buffers else {"broadcast_buffers": False}
    ddp = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=strategy.find_unused_parameters,
        bucket_cap_mb=strategy.bucket_cap_mb,
        static_graph=strategy.static_graph,
        gradient_as_bucket_view=strategy.gradient_as_bucket_view,
        **extra,
    )
    _register_comm_hook(ddp, strategy.comm_hook)
    dtype = compute_dtype(env.precision)
    if dtype is not None:
        ddp.forward = AutocastForward(ddp.forward, device.type, dtype)  # type: ignore[method-assign]
    wrapped = DDPWrapped(strategy=strategy, env=env, module=model, ddp=ddp, scaler=scaler)
    return wrapped.attach(optimizer, scheduler)
