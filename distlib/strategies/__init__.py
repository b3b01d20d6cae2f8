"""Strategy values: frozen, hashable, torch-free (their appliers live in ``distlib.training``)."""

from distlib.strategies.base import STRATEGY_NAMES, Strategy, parse_strategy, strategy_options
from distlib.strategies.ddp import DDP
from distlib.strategies.deepspeed import DeepSpeed
from distlib.strategies.fsdp import FSDP
from distlib.strategies.single import Single
from distlib.strategies.xla import XLA

__all__ = [
    "DDP",
    "FSDP",
    "STRATEGY_NAMES",
    "XLA",
    "DeepSpeed",
    "Single",
    "Strategy",
    "parse_strategy",
    "strategy_options",
]
