"""The `FSDP` strategy: FSDP2 (``torch.distributed.fsdp.fully_shard``) and its options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from distlib.strategies._validate import check_choice, check_min, check_type

__all__ = ["FSDP"]

STATE_DICT_TYPES = ("sharded", "full")


@dataclass(frozen=True, slots=True, kw_only=True)
class FSDP:
    """Fully sharded data parallel (FSDP2).

    Args:
        reshard_after_forward: free the gathered parameters after forward (ZeRO-3 style);
            False keeps them until backward (ZeRO-2 style).
        cpu_offload: keep sharded parameters, gradients and optimizer state on the CPU.
        wrap_classes: names of module classes that each become their own FSDP unit
            (e.g. ``("LlamaDecoderLayer",)``).
        min_num_params: modules with at least this many parameters become their own unit
            (0: off). Used when ``wrap_classes`` is empty.
        activation_checkpointing: recompute the activations of each unit in backward.
        state_dict_type: ``"sharded"`` (each rank its shard) or ``"full"`` (gathered).
        hybrid_shard: replicate across machines and shard within one (HSDP, a 2-D mesh).

    Example:
        >>> FSDP(wrap_classes=["Block"]).wrap_classes
        ('Block',)
    """

    name: ClassVar[str] = "fsdp"
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    wrap_classes: tuple[str, ...] = ()
    min_num_params: int = 0
    activation_checkpointing: bool = False
    state_dict_type: str = "sharded"
    hybrid_shard: bool = False

    def __post_init__(self) -> None:
        for flag in ("reshard_after_forward", "cpu_offload", "activation_checkpointing",
                     "hybrid_shard"):
            check_type("FSDP", flag, getattr(self, flag), bool)
        if isinstance(self.wrap_classes, str):
            object.__setattr__(self, "wrap_classes", tuple(
                c.strip() for c in self.wrap_classes.split(",") if c.strip()))
        else:
            object.__setattr__(self, "wrap_classes", tuple(self.wrap_classes))
        for cls in self.wrap_classes:
            check_type("FSDP", "wrap_classes[...]", cls, str)
        check_type("FSDP", "min_num_params", self.min_num_params, int)
        check_min("FSDP", "min_num_params", self.min_num_params, 0)
        check_choice("FSDP", "state_dict_type", self.state_dict_type, STATE_DICT_TYPES)
