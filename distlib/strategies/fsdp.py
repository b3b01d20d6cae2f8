"""The `FSDP` strategy value: FSDP2 (``torch.distributed.fsdp.fully_shard``) and its options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from distlib.errors import ConfigError
from distlib.strategies._validate import check_choice, check_min, check_type

__all__ = ["AUTO", "FSDP", "STATE_DICT_TYPES"]

STATE_DICT_TYPES = ("sharded", "full")
AUTO = "auto"  # wrap_classes="auto": the model's own _no_split_modules


@dataclass(frozen=True, slots=True, kw_only=True)
class FSDP:
    """Fully sharded data parallel (FSDP2).

    Args:
        reshard_after_forward: free the gathered parameters after forward (ZeRO-3 style);
            False keeps them until backward (ZeRO-2 style).
        cpu_offload: keep sharded parameters, gradients and optimizer state on the CPU.
        wrap_classes: names of module classes that each become their own FSDP unit
            (e.g. ``("LlamaDecoderLayer",)``), or ``"auto"``: the classes the model lists in
            its ``_no_split_modules`` (transformers models carry it), as Accelerate's
            ``TRANSFORMER_BASED_WRAP`` does without class names.
        min_num_params: modules with at least this many parameters become their own unit
            (0: off). Used when ``wrap_classes`` is empty.
        activation_checkpointing: recompute the activations of each unit in backward.
        state_dict_type: ``"sharded"`` (each rank its shard) or ``"full"`` (gathered).
        hybrid_shard: replicate across machines and shard within one (HSDP, a 2-D mesh
            ``(num_nodes, ranks per machine)``; on one machine that is plain sharding).
        sync_module_states: before sharding, broadcast rank 0's parameters and buffers to
            every rank, so ranks that initialised (or loaded) differently start equal.
        forward_prefetch: each unit explicitly prefetches the next unit's all-gather in
            forward (FSDP2's ``set_modules_to_forward_prefetch``), overlapping it with compute.

    Examples:
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
    sync_module_states: bool = False
    forward_prefetch: bool = False

    def __post_init__(self) -> None:
        for flag in ("reshard_after_forward", "cpu_offload", "activation_checkpointing",
                     "hybrid_shard", "sync_module_states", "forward_prefetch"):
            check_type("FSDP", flag, getattr(self, flag), bool)
        if isinstance(self.wrap_classes, str):
            object.__setattr__(self, "wrap_classes", tuple(
                c.strip() for c in self.wrap_classes.split(",") if c.strip()))
        else:
            object.__setattr__(self, "wrap_classes", tuple(self.wrap_classes))
        for cls in self.wrap_classes:
            check_type("FSDP", "wrap_classes[...]", cls, str)
        if AUTO in self.wrap_classes and len(self.wrap_classes) > 1:
            msg = (f"FSDP: wrap_classes must be 'auto' alone or class names, but got "
                   f"{list(self.wrap_classes)}. Drop 'auto', or pass wrap_classes='auto'.")
            raise ConfigError(msg)
        check_type("FSDP", "min_num_params", self.min_num_params, int)
        check_min("FSDP", "min_num_params", self.min_num_params, 0)
        check_choice("FSDP", "state_dict_type", self.state_dict_type, STATE_DICT_TYPES)

