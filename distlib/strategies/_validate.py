"""Small validators shared by the strategy values' ``__post_init__``."""

from __future__ import annotations

from collections.abc import Iterable


def check_choice(owner: str, name: str, value: object, choices: Iterable[object]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    allowed = tuple(choices)
    if value not in allowed:
        msg = (
            f"{owner}: {name} must be one of {', '.join(map(repr, allowed))}, "
            f"but got {value!r}."
        )
        raise ValueError(msg)


def check_type(owner: str, name: str, value: object, kind: type | tuple[type, ...]) -> None:
    """Raise TypeError unless ``value`` is an instance of ``kind`` (bool is not an int)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    bad_bool = isinstance(value, bool) and bool not in kinds
    if bad_bool or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        msg = f"{owner}: {name} must be {names}, but got {value!r} ({type(value).__name__})."
        raise TypeError(msg)


def check_min(owner: str, name: str, value: float, minimum: float) -> None:
    """Raise ValueError unless ``value >= minimum``."""
    if value < minimum:
        msg = f"{owner}: {name} must be >= {minimum}, but got {value!r}."
        raise ValueError(msg)
