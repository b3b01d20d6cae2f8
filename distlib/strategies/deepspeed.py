"""The `DeepSpeed` strategy value: DeepSpeed's engine with ZeRO stages 0-3, and its options."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from distlib.errors import ConfigError
from distlib.strategies._validate import check_choice, check_min, check_type

__all__ = ["OFFLOAD_DEVICES", "DeepSpeed"]

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
        offload_optimizer_nvme_path: the folder for optimizer states under
            ``offload_optimizer="nvme"``.
        offload_param_nvme_path: the folder for parameters under ``offload_param="nvme"``.
        gather_16bit_weights_on_save: under ZeRO-3, gather the 16-bit weights when DeepSpeed
            saves the model (its ``stage3_gather_16bit_weights_on_model_save``; None: the
            config's value).

    Examples:
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
    offload_optimizer_nvme_path: str | None = None
    offload_param_nvme_path: str | None = None
    gather_16bit_weights_on_save: bool | None = None

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
        for key in ("optimizer", "param"):
            path = getattr(self, f"offload_{key}_nvme_path")
            if path is None:
                continue
            check_type("DeepSpeed", f"offload_{key}_nvme_path", path, str)
            if getattr(self, f"offload_{key}") != "nvme":
                msg = (f"DeepSpeed: offload_{key}_nvme_path must come with offload_{key}='nvme',"
                       f" but got offload_{key}={getattr(self, f'offload_{key}')!r}. Set both, "
                       "or drop the path.")
                raise ConfigError(msg)
        if self.gather_16bit_weights_on_save is not None:
            check_type("DeepSpeed", "gather_16bit_weights_on_save",
                       self.gather_16bit_weights_on_save, bool)

