"""The `DeepSpeed` strategy: ``deepspeed.initialize`` with ZeRO stages 0-3."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from distlib.strategies._validate import check_choice, check_min, check_type

__all__ = ["DeepSpeed"]

OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeepSpeed:
    """DeepSpeed's engine with ZeRO.

    Args:
        zero_stage: 0, 1, 2 or 3 (ignored where ``config`` sets it).
        config: a DeepSpeed config as a dict or the path of a JSON file; distlib fills in
            batch sizes, accumulation, clipping and precision where they are ``"auto"`` or absent.
        offload_optimizer: ``"none"``, ``"cpu"`` or ``"nvme"``.
        offload_param: ``"none"``, ``"cpu"`` or ``"nvme"`` (ZeRO-3 only).
        gradient_accumulation_steps: micro-steps per optimizer step (None: from the config, else 1).
        gradient_clipping: max gradient norm applied inside DeepSpeed's step (None: off).

    Example:
        >>> DeepSpeed(zero_stage=3).zero_stage
        3
    """

    name: ClassVar[str] = "deepspeed"
    zero_stage: int = 2
    config: str | Mapping[str, Any] | None = field(default=None, hash=False)
    offload_optimizer: str = "none"
    offload_param: str = "none"
    gradient_accumulation_steps: int | None = None
    gradient_clipping: float | None = None

    def __post_init__(self) -> None:
        check_choice("DeepSpeed", "zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_choice("DeepSpeed", "offload_optimizer", self.offload_optimizer, OFFLOAD_DEVICES)
        check_choice("DeepSpeed", "offload_param", self.offload_param, OFFLOAD_DEVICES)
        if self.config is not None:
            check_type("DeepSpeed", "config", self.config, (str, Mapping))
        if self.gradient_accumulation_steps is not None:
            check_type("DeepSpeed", "gradient_accumulation_steps",
                       self.gradient_accumulation_steps, int)
            check_min("DeepSpeed", "gradient_accumulation_steps",
                      self.gradient_accumulation_steps, 1)
        if self.gradient_clipping is not None:
            check_type("DeepSpeed", "gradient_clipping", self.gradient_clipping, (int, float))
            check_min("DeepSpeed", "gradient_clipping", self.gradient_clipping, 0)
