"""Build models without allocating their weights: `init_empty_weights`, `init_on_device`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["init_empty_weights", "init_on_device"]


@contextlib.contextmanager
def init_on_device(device: Any, include_buffers: bool = False) -> Iterator[None]:
    """Create every parameter (and buffer, when asked) of models built inside on ``device``.

    Parameters are created where torch would create them and moved to ``device`` when a
    module registers them, so constructors that compute values on the CPU still run.
    With ``include_buffers=True`` every tensor factory call is sent to ``device`` instead
    (torch's own device context), buffers included.

    Args:
        device: a ``torch.device`` or a string such as ``"meta"``, ``"cpu"`` or ``"cuda:0"``.
        include_buffers: also place buffers (and any other tensor created inside) there.

    Effects: while the block runs, ``torch.nn.Module.register_parameter`` is replaced for the
    whole process (other threads building modules at the same time are affected too); it is
    restored on exit, also on error.

    Examples:
        >>> import torch
        >>> with init_on_device("meta"):
        ...     layer = torch.nn.Linear(4, 4)
        >>> layer.weight.device
        device(type='meta')
    """
    import torch

    target = torch.device(device)
    if include_buffers:
        with target:
            yield
        return
    original = torch.nn.Module.register_parameter

    def register_parameter(module: torch.nn.Module, name: str, param: Any) -> None:
        original(module, name, param)
        if param is None:
            return
        registered = module._parameters[name]
        if registered is None or registered.device == target:
            return  # already there: keep the object, so tied parameters stay one
        attrs = dict(registered.__dict__)
        moved = type(registered)(registered.to(target), requires_grad=registered.requires_grad)
        moved.__dict__.update(attrs)
        module._parameters[name] = moved

    torch.nn.Module.register_parameter = register_parameter  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Create models on the meta device: no memory, no time, whatever their size.

    Buffers keep real values by default (a rotary embedding's ``inv_freq`` is computed, not
    loaded); ``include_buffers=True`` puts them on the meta device too.

    Args:
        include_buffers: also create buffers on the meta device.

    Effects: as `init_on_device` with ``device="meta"``.

    Examples:
        >>> import torch
        >>> with init_empty_weights():
        ...     big = torch.nn.Sequential(*[torch.nn.Linear(10_000, 10_000) for _ in range(100)])
        >>> big[0].weight.is_meta, sum(p.numel() for p in big.parameters())
        (True, 10001000000)
    """
    with init_on_device("meta", include_buffers=include_buffers):
        yield
