"""The `XLA` applier: the model on this replica's XLA device, the optimizer through torch_xla.

What only the XLA strategy needs lives here (placing a model with its ties kept, rebinding the
optimizer, the precision and replica checks, `XLAOptimizer`); the torch_xla calls that
`detect()`, data, collectives and checkpoints share stay in ``distlib._xla``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from distlib import _xla
from distlib._tree import map_tree
from distlib.env import Env
from distlib.errors import PrecisionError, StrategyError
from distlib.precision import AutocastForward
from distlib.strategies.xla import XLA
from distlib.training.optimizers import DelegatingOptimizer
from distlib.training.single import SingleWrapped

__all__ = [
    "XLAOptimizer", "XLAWrapped", "apply", "check_autograd", "check_precision",
    "check_replicas", "place", "rebind_optimizer",
]


class XLAWrapped(SingleWrapped):
    """A model on an XLA device: this process's autograd; torch_xla reduces in the step."""


def check_replicas(env: Env, *, spmd: bool) -> None:
    """Refuse the replica layouts whose collectives cannot complete on the CPU client.

    On ``PJRT_DEVICE=CPU`` several processes (torchrun) each see a world of one device, and
    several xmp replicas compile one module each whose collectives never meet (the
    rendezvous aborts after 10 s): pytorch/xla#5005 and #9089. SPMD is not affected.

    Raises:
        StrategyError: CPU client with more than one replica outside SPMD.
    """
    _, _, xr = _xla.modules("apply()")
    if spmd or xr.device_type() != "CPU":
        return
    replicas = max(int(env.world_size), int(xr.world_size()))
    if replicas > 1:
        msg = (f"apply(): XLA on the CPU client must run as one replica, but got {replicas} "
               f"replicas (world_size={env.world_size}, torch_xla world_size={xr.world_size()}). "
               "Its collectives never complete there (pytorch/xla#9089). Use XLA(spmd=True) "
               "with CPU_NUM_DEVICES=N and XLA_USE_SPMD=1 for several CPU devices, or a TPU.")
        raise StrategyError(msg)


def check_autograd(target: torch.device) -> None:
    """Fail now, clearly, if autograd cannot run on the XLA device in this process.

    torch's autograd engine sizes its per-device queues at its first backward; a backward that
    ran on the CPU before the XLA runtime started leaves no queue for the XLA device, and every
    later XLA backward dies with an internal assert. A scalar backward here finds that out.

    Raises:
        StrategyError: a backward ran before the XLA runtime started.
    """
    probe = torch.zeros((), device=target, requires_grad=True)
    try:
        (probe * 1.0).backward()  # type: ignore[no-untyped-call]
    except RuntimeError as exc:
        if "device_ready_queues_" not in str(exc):
            raise
        msg = ("apply(): the XLA runtime must start before the first backward of the process, "
               "but got a backward that ran earlier (autograd then has no queue for the XLA "
               "device). Call distlib.detect() or wrap() before any backward on the CPU.")
        raise StrategyError(msg) from None


def check_precision(precision: Any) -> torch.dtype | None:
    """The autocast dtype for a precision under XLA: None for ``"no"``, bf16 for ``"bf16"``.

    Raises:
        PrecisionError: fp16 or fp8 (TPUs compute in bf16; there is no fp16 grad scaling here).

    Examples:
        >>> check_precision("bf16")
        torch.bfloat16
    """
    value = getattr(precision, "value", precision)
    if value == "no":
        return None
    if value == "bf16":
        return torch.bfloat16
    msg = (f"apply(): precision under XLA must be 'no' or 'bf16', but got {value!r}. TPUs "
           "compute in bfloat16; use --precision bf16.")
    raise PrecisionError(msg)


def place(model: torch.nn.Module, target: torch.device) -> dict[int, torch.nn.Parameter]:
    """Move a module's parameters and buffers to an XLA device, keeping tied weights tied.

    ``module.to("xla")`` cannot swap tensor data in place across devices, so it makes new
    Parameters, and makes two for a weight shared by two modules (the tie is lost). This
    makes one new Parameter per distinct old one.

    Returns:
        ``{id(old parameter): new parameter}``, to rebind an optimizer.

    Effects: replaces the parameters and buffers of ``model`` (and its submodules) in place.
    """
    new_params: dict[int, torch.nn.Parameter] = {}
    new_buffers: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in new_params:
                moved = torch.nn.Parameter(param.detach().to(target),
                                           requires_grad=param.requires_grad)
                moved.__dict__.update(param.__dict__)
                if param.grad is not None:
                    moved.grad = param.grad.to(target)
                new_params[id(param)] = moved
            module._parameters[name] = new_params[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                new_buffers.setdefault(id(buffer), buffer.to(target))
                module._buffers[name] = new_buffers[id(buffer)]
    return new_params


def rebind_optimizer(optimizer: torch.optim.Optimizer,
                     mapping: Mapping[int, torch.nn.Parameter], target: torch.device) -> None:
    """Point an optimizer at the moved parameters; move any state it already holds.

    Raises:
        StrategyError: the optimizer holds a parameter that is not the model's.

    Effects: rewrites ``optimizer.param_groups`` and ``optimizer.state`` in place.
    """
    for index, group in enumerate(optimizer.param_groups):
        missing = [tuple(p.shape) for p in group["params"] if id(p) not in mapping]
        if missing:
            msg = (f"apply(): the optimizer must only hold the model's parameters, but got "
                   f"param group {index} with {len(missing)} others (shapes {missing[:3]}). "
                   "Build the optimizer from model.parameters() of the model you wrap.")
            raise StrategyError(msg)
    state: dict[torch.Tensor, Any] = {mapping[id(p)]: map_tree(lambda t: t.to(target), s)
                                      for p, s in optimizer.state.items() if id(p) in mapping}
    for group in optimizer.param_groups:
        group["params"] = [mapping[id(p)] for p in group["params"]]
    optimizer.state.clear()
    optimizer.state.update(state)


class XLAOptimizer(DelegatingOptimizer):
    """The user's optimizer whose ``step()`` is torch_xla's ``xm.optimizer_step``.

    ``step()`` all-reduces (averages) the gradients when the runtime has several replicas,
    steps the wrapped optimizer and, with ``sync=True``, cuts and runs the graph. Under SPMD
    the partitioner has already reduced the gradients and torch_xla's world size is 1.
    Everything else (``param_groups``, ``state``, ``state_dict``) is the wrapped optimizer's.
    """

    _OWN = ("optimizer", "sync", "__setstate__")

    def __init__(self, optimizer: torch.optim.Optimizer, *, sync: bool = True) -> None:
        super().__init__(optimizer)
        self.sync = sync

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Reduce gradients across replicas, step, and cut the graph (when ``sync``)."""
        _, xm, _ = _xla.modules("optimizer.step()")
        args = {} if closure is None else {"closure": closure}
        return xm.optimizer_step(self.optimizer, barrier=self.sync, optimizer_args=args)

    def __repr__(self) -> str:
        return f"XLAOptimizer({self.optimizer!r}, sync={self.sync})"


def apply(model: torch.nn.Module, strategy: XLA, env: Env, *, optimizer: Any = None,
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
    outputs are fp32; hangs the wrapped model's `XLAWrapped` on it (as every strategy does).

    Examples:
        >>> import torch, distlib as dl
        >>> apply(torch.nn.Linear(2, 2), XLA(), dl.Env(precision="fp16"))
        Traceback (most recent call last):
        ...
        distlib.errors.PrecisionError: apply(): precision under XLA must be 'no' or 'bf16', ...
    """
    dtype = check_precision(env.precision)
    if strategy.spmd and not _xla.is_spmd():
        msg = ("apply(): XLA(spmd=True) must run in SPMD mode, but got XLA_USE_SPMD unset. "
               "Launch with XLA_USE_SPMD=1 in the environment, or call "
               "torch_xla.runtime.use_spmd() first thing in the script.")
        raise StrategyError(msg)
    check_replicas(env, spmd=strategy.spmd)
    target = _xla.device()
    check_autograd(target)
    mapping = place(model, target)
    if optimizer is not None:
        rebind_optimizer(optimizer, mapping, target)
        optimizer = XLAOptimizer(optimizer, sync=strategy.sync_on_step)
    if dtype is not None:
        model.forward = AutocastForward(model.forward, "xla", dtype)  # type: ignore[method-assign]
    wrapped = XLAWrapped(strategy=strategy, env=env, module=model)
    return wrapped.attach(optimizer, scheduler)
