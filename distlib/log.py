"""A logger on the standard `logging` module that speaks on the main rank only unless asked.

Nothing is configured here: no handlers, no levels. Configure `logging` as usual (for example
``logging.basicConfig(level="INFO")``); distlib only decides which ranks emit a record.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from distlib.collectives import barrier
from distlib.env import Env

__all__ = ["RankLogger", "get_logger", "main_print"]


class RankLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A `logging.LoggerAdapter` that drops records on ranks other than 0 by default.

    Each call takes ``main_process_only=False`` to log on every rank (prefixed with the rank)
    and ``in_order=True`` to have the ranks log one after another.
    """

    def __init__(self, logger: logging.Logger, env: Env) -> None:
        super().__init__(logger, {"rank": env.rank})
        self.env = env

    def process(self, msg: Any, kwargs: MutableMapping[str, Any],
                ) -> tuple[Any, MutableMapping[str, Any]]:
        """Prefix the rank when several processes take part."""
        if self.env.is_distributed:
            msg = f"[rank {self.env.rank}] {msg}"
        return msg, kwargs

    def log(  # type: ignore[override]
            self, level: int, msg: Any, *args: Any, main_process_only: bool = True,
            in_order: bool = False, **kwargs: Any) -> None:
        """Log on rank 0 only (default), or on every rank; ``in_order`` takes turns.

        Effects: ``in_order`` on a multi-rank Env runs one barrier per rank.
        """
        if in_order and self.env.is_distributed:
            for rank in range(self.env.world_size):
                if rank == self.env.rank:
                    self._emit(level, msg, args, kwargs)
                barrier(self.env)
            return
        if main_process_only and not self.env.is_main:
            return
        self._emit(level, msg, args, kwargs)

    def _emit(self, level: int, msg: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.isEnabledFor(level):
            msg, kwargs = self.process(msg, kwargs)  # type: ignore[assignment]
            self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str, env: Env, level: int | str | None = None) -> RankLogger:
    """Return a logger for ``name`` that logs on the main rank only unless told otherwise.

    Args:
        name: the `logging` name, usually ``__name__``.
        env: this process's Env.
        level: set this level on the underlying logger (None leaves it).

    Examples:
        >>> log = get_logger("distlib.doctest", Env(rank=1, world_size=2, local_rank=1,
        ...                                          local_world_size=2))
        >>> log.warning("not shown on rank 1")
        >>> log.warning("shown", main_process_only=False)
    """
    logger = logging.getLogger(name)
    if level is not None:
        logger.setLevel(level)
    return RankLogger(logger, env)


def main_print(env: Env, *values: object, local: bool = False, **print_kwargs: Any) -> None:
    """`print` on the main process only (rank 0), or on each machine's first rank; flushed.

    This is the answer to Accelerate's ``accelerator.print``, which prints on each machine's
    first rank: ``main_print(env, ..., local=True)``. The line is flushed at once (unless
    ``flush=False``), so it reaches the console promptly even when the launcher captures the
    ranks' output into files (``--log-dir``, ``--ranks-filter``, ``--rank-prefix``), where a
    rank's stdout is no terminal and Python would otherwise buffer it until the rank ends.

    Args:
        env: this process's Env.
        *values: what `print` prints.
        local: print on the first rank of every machine (``env.is_local_main``) instead of
            on global rank 0 only.
        **print_kwargs: `print`'s keywords (``sep``, ``end``, ``file``, ``flush``; flush
            defaults to True).

    Examples:
        >>> main_print(Env(), "step", 1, sep="=")
        step=1
        >>> main_print(Env(rank=1, world_size=2, local_rank=1, local_world_size=2), "not shown")

    Effects: writes to ``sys.stdout`` (or ``file=``) on the chosen ranks.
    """
    if env.is_local_main if local else env.is_main:
        print(*values, **{"flush": True} | print_kwargs)
