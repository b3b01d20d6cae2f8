"""The `XLA` strategy value: the model on an XLA device (TPU, or the CPU PJRT client)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from distlib.strategies._validate import check_type

__all__ = ["XLA"]


@dataclass(frozen=True, slots=True, kw_only=True)
class XLA:
    """Run on torch_xla's device; the optimizer step goes through torch_xla.

    Args:
        sync_on_step: cut and run the lazy graph at the end of every ``optimizer.step()``
            (``xm.optimizer_step(..., barrier=True)``). Turn it off only when batches come
            through torch_xla's parallel loader, whose ``next()`` cuts the graph itself.
        spmd: one process drives every device of the machine as an SPMD program (batches
            split along dim 0 over a ``"data"`` mesh; the compiler inserts the gradient
            all-reduce). Needs ``XLA_USE_SPMD=1`` in the launch environment. This is also
            the only way to use several devices of the CPU client (see docs/tpu.md).

    Examples:
        >>> XLA()
        XLA(sync_on_step=True, spmd=False)
    """

    name: ClassVar[str] = "xla"
    sync_on_step: bool = True
    spmd: bool = False

    def __post_init__(self) -> None:
        check_type("XLA", "sync_on_step", self.sync_on_step, bool)
        check_type("XLA", "spmd", self.spmd, bool)

