"""The `Single` strategy value: one process, the model placed on the Env's device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

__all__ = ["Single"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Single:
    """One process; ``wrap`` only moves the model to the device.

    Examples:
        >>> Single()
        Single()
    """

    name: ClassVar[str] = "single"
