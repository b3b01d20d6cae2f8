"""The `DDP` strategy value: torch's DistributedDataParallel and its options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from distlib.strategies._validate import check_choice, check_min, check_type

__all__ = ["COMM_HOOKS", "DDP"]

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

