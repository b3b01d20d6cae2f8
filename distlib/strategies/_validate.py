"""Small validators shared by the strategy values' ``__post_init__``.

Each raises a `ConfigError` (a ``ValueError``): a strategy option is a setting like any
launcher option. A value of the wrong type raises `OptionTypeError`, which is a
`ConfigError` and a ``TypeError`` too, so ``except TypeError`` keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable

from distlib.errors import ConfigError

__all__ = ["OptionTypeError", "check_choice", "check_min", "check_type"]


class OptionTypeError(ConfigError, TypeError):
    """A strategy option holds a value of the wrong type."""


def check_choice(owner: str, name: str, value: object, choices: Iterable[object]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``.

    Examples:
        >>> check_choice("DDP", "comm_hook", "int8", ("none", "fp16"))
        Traceback (most recent call last):
        ...
        distlib.errors.ConfigError: DDP: comm_hook must be one of 'none', 'fp16', but got 'int8'. ...
    """
    allowed = tuple(choices)
    if value not in allowed:
        msg = (
            f"{owner}: {name} must be one of {', '.join(map(repr, allowed))}, "
            f"but got {value!r}. Pick one of those, e.g. {owner}({name}={allowed[0]!r})."
        )
        raise ConfigError(msg)


def check_type(owner: str, name: str, value: object, kind: type | tuple[type, ...]) -> None:
    """Raise OptionTypeError unless ``value`` is an instance of ``kind`` (bool is not an int)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    bad_bool = isinstance(value, bool) and bool not in kinds
    if bad_bool or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        msg = (f"{owner}: {name} must be {names}, but got {value!r} ({type(value).__name__}). "
               f"Pass a {names} (a config file or flag gives strings: check its spelling).")
        raise OptionTypeError(msg)


def check_min(owner: str, name: str, value: float, minimum: float) -> None:
    """Raise ConfigError unless ``value >= minimum``."""
    if value < minimum:
        msg = (f"{owner}: {name} must be >= {minimum}, but got {value!r}. "
               f"Pass a value of at least {minimum}.")
        raise ConfigError(msg)
