"""The exception tree of distlib: every error it raises on purpose.

Each class also subclasses the builtin that a plain ``except`` clause would expect, so
``except ValueError`` keeps working for bad input::

    DistlibError
    ├── EnvError(DistlibError, ValueError)          bad launch variables or Env fields
    ├── ConfigError(DistlibError, ValueError)       a config file or launcher option is wrong
    ├── ShardingError(DistlibError, ValueError)     a loader cannot be sharded as asked
    ├── CollectiveError(DistlibError, RuntimeError) ranks disagree on what they exchange
    ├── StrategyError(DistlibError, RuntimeError)   a strategy cannot wrap this model / env
    ├── PrecisionError(DistlibError, ValueError)    a precision the hardware cannot run
    ├── RuntimeStateError(DistlibError, RuntimeError) the process group disagrees with the Env
    ├── LaunchError(DistlibError, RuntimeError)     a launched job failed
    ├── CheckpointError(DistlibError, RuntimeError) a checkpoint is missing, corrupt or mismatched
    └── DeviceMapError(DistlibError, ValueError)    a device map cannot be planned or applied

Messages follow one template: "`<call>`: `<name>` must <rule>, but got `<value>`. <fix>."
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CollectiveError",
    "ConfigError",
    "DeviceMapError",
    "DistlibError",
    "EnvError",
    "LaunchError",
    "PrecisionError",
    "RuntimeStateError",
    "ShardingError",
    "StrategyError",
]


class DistlibError(Exception):
    """Base class of every error distlib raises on purpose."""


class EnvError(DistlibError, ValueError):
    """A launch variable or an `Env` field breaks a rule."""


class ConfigError(DistlibError, ValueError):
    """A config file, a config key or a launcher option is wrong."""


class ShardingError(DistlibError, ValueError):
    """A data loader cannot be sharded as asked."""


class CollectiveError(DistlibError, RuntimeError):
    """Ranks disagree on what a collective exchanges (shape, dtype, structure)."""


class StrategyError(DistlibError, RuntimeError):
    """A strategy cannot be applied to this model, optimizer or Env."""


class PrecisionError(DistlibError, ValueError):
    """A precision is unknown, or this hardware cannot run it."""


class RuntimeStateError(DistlibError, RuntimeError):
    """The process group or device state disagrees with the Env in use."""


class LaunchError(DistlibError, RuntimeError):
    """A launched job failed; the message carries the failing rank's root cause."""


class CheckpointError(DistlibError, RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or does not match what loads it."""


class DeviceMapError(DistlibError, ValueError):
    """A device map cannot be planned, or does not fit the model it is applied to."""
