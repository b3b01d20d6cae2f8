"""Precision values, and the autocast, fp32-output and gradient-scaling pieces behind them.

Below `env` (an Env holds a `Precision`), so nothing here takes an Env: the verb that does,
`distlib.autocast(env)`, lives with the other step verbs in `distlib.training.step`.

`Precision` and `parse_precision` are pure and torch-free, so the launcher and `detect()` use
them cheaply; the functions that act on tensors import torch when called.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

from distlib._tree import map_tree
from distlib.errors import PrecisionError

__all__ = [
    "AutocastForward",
    "Precision",
    "check_supported",
    "compute_dtype",
    "make_scaler",
    "parse_precision",
    "to_float32",
]


class Precision(str, Enum):
    """Numeric precision of a training or inference run.

    Plain strings are accepted wherever a `Precision` is: ``Precision("bf16") is Precision.BF16``.

    Examples:
        >>> Precision("fp16").value
        'fp16'
        >>> Precision.NO == "no"
        True
    """

    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return f"Precision.{self.name}"


_ALIASES = {
    "no": Precision.NO,
    "fp32": Precision.NO,
    "float32": Precision.NO,
    "none": Precision.NO,
    "fp16": Precision.FP16,
    "float16": Precision.FP16,
    "half": Precision.FP16,
    "bf16": Precision.BF16,
    "bfloat16": Precision.BF16,
    "fp8": Precision.FP8,
}


def parse_precision(value: object, *, source: str = "precision") -> Precision:
    """Turn a `Precision`, a string or None into a `Precision`.

    Args:
        value: a `Precision`, one of its string values or an alias such as ``"bfloat16"``;
            None means ``"no"``.
        source: the name of the input, quoted in the error (e.g. ``"DISTLIB_PRECISION"``).

    Returns:
        The matching `Precision`.

    Raises:
        PrecisionError: the value is not a known precision.

    Examples:
        >>> parse_precision("bfloat16")
        Precision.BF16
    """
    if value is None:
        return Precision.NO
    if isinstance(value, Precision):
        return value
    if isinstance(value, str) and value.strip().lower() in _ALIASES:
        return _ALIASES[value.strip().lower()]
    choices = ", ".join(repr(p.value) for p in Precision)
    msg = (
        f"{source} must be one of {choices}, but got {value!r}. "
        "Use 'bf16' or 'fp16' for mixed precision, 'no' for full fp32."
    )
    raise PrecisionError(msg)


def compute_dtype(precision: object) -> Any:
    """Return the torch dtype that mixed precision computes in, or None for full fp32.

    Examples:
        >>> compute_dtype("bf16")
        torch.bfloat16
        >>> compute_dtype("no") is None
        True
    """
    import torch

    return {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}.get(
        parse_precision(precision))


def check_supported(precision: object, device: str) -> Precision:
    """Return the precision if ``device`` can train in it, else raise `PrecisionError`.

    fp8 needs torchao and an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper).

    Examples:
        >>> check_supported("bf16", "cpu")
        Precision.BF16
    """
    value = parse_precision(precision)
    if value is not Precision.FP8:
        return value
    import importlib.util

    import torch

    if importlib.util.find_spec("torchao") is None:
        msg = ("wrap(): precision 'fp8' must have torchao installed, but got no torchao module. "
               "Install it (`pip install torchao`) or use 'bf16'.")
        raise PrecisionError(msg)
    capability = (torch.cuda.get_device_capability(torch.device(device))
                  if device.startswith("cuda") and torch.cuda.is_available() else None)
    if capability is None or capability < (8, 9):
        msg = (f"wrap(): precision 'fp8' must run on a GPU of compute capability >= 8.9, but got "
               f"device {device!r} (capability {capability}). Use 'bf16' on this hardware.")
        raise PrecisionError(msg)
    return value


def convert_fp8(module: Any) -> Any:
    """Swap the module's linear layers for torchao's float8 training layers, in place.

    Effects: replaces ``nn.Linear`` submodules of ``module``; returns the same module.
    """
    from torchao.float8 import convert_to_float8_training  # type: ignore[import-not-found]

    def big_enough(mod: Any, _fqn: str) -> bool:
        # float8 matmuls need both dimensions divisible by 16.
        return bool(mod.in_features % 16 == 0 and mod.out_features % 16 == 0)

    convert_to_float8_training(module, module_filter_fn=big_enough)
    return module


def make_scaler(precision: object, device: str) -> Any:
    """Return a `torch.amp.GradScaler` for fp16 on ``device``, or None for other precisions.

    Examples:
        >>> make_scaler("fp16", "cpu").get_scale()
        65536.0
        >>> make_scaler("bf16", "cpu") is None
        True
    """
    if parse_precision(precision) is not Precision.FP16:
        return None
    import torch

    return torch.amp.GradScaler(device.partition(":")[0])


def to_float32(value: Any) -> Any:
    """Return ``value`` with every fp16/bf16 tensor in it cast to fp32 (nested containers too).

    Containers keep their type (a namedtuple, an ``OrderedDict``, a transformers
    ``ModelOutput``); anything that is not a tensor is returned as it is.

    Examples:
        >>> import torch
        >>> to_float32({"y": [torch.ones(1, dtype=torch.bfloat16)]})["y"][0].dtype
        torch.float32
    """
    import torch

    half = (torch.float16, torch.bfloat16)
    return map_tree(lambda t: t.float() if t.dtype in half else t, value)


class AutocastForward:
    """A module's ``forward`` run under autocast (or with inputs cast), outputs in fp32.

    Picklable (a class, not a closure), so a wrapped model can still be saved whole.

    Args:
        forward: the bound ``forward`` it replaces.
        device_type: ``"cpu"``, ``"cuda"``, ...
        dtype: the compute dtype (None: plain fp32, only the output cast remains).
        cast_inputs: cast floating inputs to ``dtype`` instead of using autocast (for models
            whose weights are already in ``dtype``, as DeepSpeed's engine).
    """

    __slots__ = ("cast_inputs", "device_type", "dtype", "forward")

    def __init__(self, forward: Callable[..., Any], device_type: str, dtype: Any,
                 *, cast_inputs: bool = False) -> None:
        self.forward = forward
        self.device_type = device_type
        self.dtype = dtype
        self.cast_inputs = cast_inputs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        if self.dtype is None:
            return self.forward(*args, **kwargs)
        if self.cast_inputs:
            args, kwargs = _cast_floats((args, kwargs), self.dtype)
            return to_float32(self.forward(*args, **kwargs))
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.forward(*args, **kwargs)
        return to_float32(out)

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _cast_floats(value: Any, dtype: Any) -> Any:
    """``value`` with every floating tensor in it cast to ``dtype`` (containers keep their type)."""
    return map_tree(lambda t: t.to(dtype) if t.is_floating_point() else t, value)
