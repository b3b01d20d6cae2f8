"""The `DDP` strategy: torch's DistributedDataParallel with its options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from distlib.strategies._validate import check_choice, check_min, check_type

__all__ = ["DDP"]

COMM_HOOKS = ("none", "fp16", "bf16", "powersgd")


@dataclass(frozen=True, slots=True, kw_only=True)
class DDP:
    """Data parallel replicas with gradient all-reduce (``DistributedDataParallel``).

    Args:
        find_unused_parameters: let DDP tolerate parameters that get no gradient.
        bucket_cap_mb: gradient bucket size in MiB.
        static_graph: promise that the graph is the same every step.
        gradient_as_bucket_view: gradients alias the communication buckets (saves memory).
        broadcast_buffers: broadcast buffers from rank 0 at every forward.
        comm_hook: gradient compression: ``"none"``, ``"fp16"``, ``"bf16"``, ``"powersgd"``.

    Example:
        >>> DDP(static_graph=True).static_graph
        True
    """

    name: ClassVar[str] = "ddp"
    find_unused_parameters: bool = False
    bucket_cap_mb: float = 25.0
    static_graph: bool = False
    gradient_as_bucket_view: bool = False
    broadcast_buffers: bool = True
    comm_hook: str = "none"

    def __post_init__(self) -> None:
        for flag in ("find_unused_parameters", "static_graph", "gradient_as_bucket_view",
                     "broadcast_buffers"):
            check_type("DDP", flag, getattr(self, flag), bool)
        check_type("DDP", "bucket_cap_mb", self.bucket_cap_mb, (int, float))
        check_min("DDP", "bucket_cap_mb", self.bucket_cap_mb, 0)
        check_choice("DDP", "comm_hook", self.comm_hook, COMM_HOOKS)
