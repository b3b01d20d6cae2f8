"""Precision values: the `Precision` enum and how a plain string becomes one.

Autocast and gradient scaling that act on tensors live with the training step; this module is
pure and imports no torch, so the launcher and `detect()` can use it cheaply.
"""

from __future__ import annotations

from enum import Enum

from distlib.errors import PrecisionError

__all__ = ["Precision", "parse_precision"]


class Precision(str, Enum):
    """Numeric precision of a training or inference run.

    Plain strings are accepted wherever a `Precision` is: ``Precision("bf16") is Precision.BF16``.

    Example:
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

    Example:
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
