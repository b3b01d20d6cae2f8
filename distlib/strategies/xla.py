"""The `XLA` strategy: the model on an XLA device (TPU, or the CPU PJRT client).

The value is torch-free; `apply` imports torch and, through ``distlib._xla``, torch_xla.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from distlib.strategies._validate import check_type

__all__ = ["XLA", "apply"]


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


def apply(model: Any, strategy: XLA, env: Any, *, optimizer: Any = None,
          scheduler: Any = None) -> tuple[Any, Any, Any]:
    """Place the model on this replica's XLA device; step the optimizer through torch_xla.

    Args:
        model: the user's ``nn.Module``.
        strategy: the `XLA` value.
        env: the Env (its ``precision`` and ``world_size`` are used).
        optimizer: the model's optimizer, or None. It is rebound to the moved parameters
            (moving to an XLA device makes new ones) and returned inside an
            ``XLAOptimizer`` whose ``step()`` is ``xm.optimizer_step``.
        scheduler: returned unchanged (it drives the wrapped optimizer's param groups).

    Returns:
        ``(model, optimizer, scheduler)``: the same module, moved; the XLA optimizer or None.

    Raises:
        StrategyError: torch_xla is missing; ``spmd=True`` without SPMD mode; several
            replicas on the CPU client outside SPMD (their collectives never complete); a
            backward already ran in this process before the XLA runtime started.
        PrecisionError: a precision other than ``"no"`` or ``"bf16"``.

    Effects: starts the PJRT runtime; replaces the model's parameters and buffers with ones on
    the XLA device (tied weights stay tied); rewrites the optimizer's param groups and state in
    place; for bf16 sets the model's ``forward`` attribute to an autocast wrapper whose
    outputs are fp32; hangs the wrapped model's handle on it (as every strategy does).

    Examples:
        >>> import torch, distlib as dl
        >>> apply(torch.nn.Linear(2, 2), XLA(), dl.Env(precision="fp16"))
        Traceback (most recent call last):
        ...
        distlib.errors.PrecisionError: apply(): precision under XLA must be 'no' or 'bf16', ...
    """
    from distlib import _xla
    from distlib.errors import StrategyError
    from distlib.precision import AutocastForward
    from distlib.strategies._handle import Handle, attach

    dtype = _xla.check_precision(env.precision)
    if strategy.spmd and not _xla.is_spmd():
        msg = ("apply(): XLA(spmd=True) must run in SPMD mode, but got XLA_USE_SPMD unset. "
               "Launch with XLA_USE_SPMD=1 in the environment, or call "
               "torch_xla.runtime.use_spmd() first thing in the script.")
        raise StrategyError(msg)
    _xla.check_replicas(env, spmd=strategy.spmd)
    target = _xla.device()
    _xla.check_autograd(target)
    mapping = _xla.place(model, target)
    if optimizer is not None:
        _xla.rebind_optimizer(optimizer, mapping, target)
        optimizer = _xla.XLAOptimizer(optimizer, sync=strategy.sync_on_step)
    if dtype is not None:
        model.forward = AutocastForward(model.forward, "xla", dtype)
    handle = Handle(strategy=strategy, env=env, precision=env.precision, module=model)
    return attach(model, handle, optimizer, scheduler)
