"""The `XLA` strategy: the model on an XLA device (TPU, or the CPU PJRT client)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

__all__ = ["XLA"]


@dataclass(frozen=True, slots=True, kw_only=True)
class XLA:
    """Run on torch_xla's device; the optimizer step goes through torch_xla.

    Example:
        >>> XLA()
        XLA()
    """

    name: ClassVar[str] = "xla"
