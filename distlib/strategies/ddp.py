"""The `DDP` strategy: torch's DistributedDataParallel with its options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from distlib.errors import StrategyError
from distlib.strategies._validate import check_choice, check_min, check_type

__all__ = ["DDP", "apply"]

COMM_HOOKS = ("none", "fp16", "bf16", "powersgd")


@dataclass(frozen=True, slots=True, kw_only=True)
class DDP:
    """Data parallel replicas with gradient all-reduce (``DistributedDataParallel``).

    Args:
        find_unused_parameters: let DDP tolerate parameters that get no gradient.
        bucket_cap_mb: gradient bucket size in MiB (None: torch's default, 25 MiB with a
            small first bucket so that communication starts early).
        static_graph: promise that the graph is the same every step.
        gradient_as_bucket_view: gradients alias the communication buckets (saves memory).
        broadcast_buffers: broadcast buffers from rank 0 at every forward.
        comm_hook: gradient compression: ``"none"``, ``"fp16"``, ``"bf16"``, ``"powersgd"``.

    Examples:
        >>> DDP(static_graph=True).static_graph
        True
    """

    name: ClassVar[str] = "ddp"
    find_unused_parameters: bool = False
    bucket_cap_mb: float | None = None
    static_graph: bool = False
    gradient_as_bucket_view: bool = False
    broadcast_buffers: bool = True
    comm_hook: str = "none"

    def __post_init__(self) -> None:
        for flag in ("find_unused_parameters", "static_graph", "gradient_as_bucket_view",
                     "broadcast_buffers"):
            check_type("DDP", flag, getattr(self, flag), bool)
        if self.bucket_cap_mb is not None:
            check_type("DDP", "bucket_cap_mb", self.bucket_cap_mb, (int, float))
            check_min("DDP", "bucket_cap_mb", self.bucket_cap_mb, 0)
        check_choice("DDP", "comm_hook", self.comm_hook, COMM_HOOKS)


def _register_comm_hook(ddp: Any, name: str) -> None:
    if name == "none":
        return
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if name == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    else:
        hook = {"fp16": default_hooks.fp16_compress_hook,
                "bf16": default_hooks.bf16_compress_hook}[name]
        ddp.register_comm_hook(None, hook)


def apply(model: Any, strategy: DDP, env: Any, *, optimizer: Any = None,
          scheduler: Any = None) -> tuple[Any, Any, Any]:
    """Wrap the model in ``DistributedDataParallel`` with the strategy's options.

    In one process with no process group joined there is nothing to synchronise: the model is
    only placed, as `Single` does.

    Returns:
        ``(ddp_model, optimizer, scheduler)``; the optimizer steps through a ``GradScaler``
        under fp16.

    Effects: joins the process group (`distlib.runtime.initialize`); moves ``model`` to the
    Env's device in place; DDP broadcasts rank 0's parameters and buffers to every rank.
    """
    from torch.nn.parallel import DistributedDataParallel

    from distlib.precision import AutocastForward, compute_dtype
    from distlib.runtime import initialize, is_initialized
    from distlib.strategies import single
    from distlib.strategies._handle import Handle, attach, place_with_precision

    initialize(env)
    if not is_initialized():
        return single.apply(model, single.Single(), env, optimizer=optimizer,
                            scheduler=scheduler)
    if strategy.comm_hook == "bf16" and env.backend != "nccl":
        msg = (f"wrap(): DDP comm_hook 'bf16' must run on the NCCL backend, but got backend "
               f"{env.backend!r}. Use comm_hook='fp16' (or 'powersgd') on gloo.")
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
    handle = Handle(strategy=strategy, env=env, precision=env.precision, module=model, ddp=ddp,
                    scaler=scaler)
    return attach(ddp, handle, optimizer, scheduler)
