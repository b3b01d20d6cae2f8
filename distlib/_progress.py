"""Progress in bytes for long checkpoint work: tqdm on stderr, on the main rank only.

Who shows a bar, decided in one place (`is_shown`): never a rank other than the main one;
with ``progress=True`` the main rank always (from the first byte); with ``progress=None``
(auto, the default of `save_state`, `load_state` and `load_checkpoint`) the main rank only
when stderr is a terminal, and only once the work has lasted `AUTO_DELAY_S` seconds, so that
a small save in a training loop prints nothing; ``progress=False`` never. The callers count
per tensor or per file, never per byte, so a bar costs nothing next to the work.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Any

from tqdm import tqdm

__all__ = ["AUTO_DELAY_S", "ByteBar", "check_progress", "is_shown"]

AUTO_DELAY_S = 2.0  # an automatic bar appears only once the work has lasted this long

# n_fmt/total_fmt with unit_scale read "2.35M"; the unit after each keeps them bytes
_FORMAT = "{l_bar}{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]"


def check_progress(progress: object, call: str) -> bool | None:
    """``progress`` itself when it is True, False or None; otherwise a clear `TypeError`.

    ``save_state(path, env, progress=...)`` takes the name from the objects to save, so a
    dict passed as ``progress=`` is told apart from the switch here.

    Raises:
        TypeError: ``progress`` is anything else (a value meant to be saved under that name).

    Examples:
        >>> check_progress(None, "save_state()") is None
        True
        >>> check_progress({"epoch": 3}, "save_state()")
        Traceback (most recent call last):
        ...
        TypeError: save_state(): progress must be True, False or None (show a progress bar: always, never, or when stderr is a terminal), but got a dict. It is the progress-bar switch: a value to save needs another name, e.g. training_progress.
    """
    if progress is None or isinstance(progress, bool):
        return progress
    msg = (f"{call}: progress must be True, False or None (show a progress bar: always, "
           f"never, or when stderr is a terminal), but got a {type(progress).__name__}. It is "
           "the progress-bar switch: a value to save needs another name, e.g. training_progress.")
    raise TypeError(msg)


def is_shown(progress: bool | None, *, main: bool, stream: Any = None) -> bool:
    """Whether a bar shows: the main rank only, when asked or when ``stream`` is a terminal.

    Args:
        progress: True (show), False (never) or None (when ``stream`` is a terminal).
        main: whether this process is the main rank.
        stream: where the bar would go (default: ``sys.stderr``).

    Examples:
        >>> import io
        >>> is_shown(True, main=True), is_shown(True, main=False)
        (True, False)
        >>> is_shown(None, main=True, stream=io.StringIO())  # not a terminal
        False
    """
    if not main or progress is False:
        return False
    if progress:
        return True
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed stream
        return False


def _screen(stream: Any) -> dict[str, Any]:
    """tqdm's size options: follow the terminal, or 80 x 24 where it reports no size (a
    pseudo-terminal nobody sized: tqdm would hide the bar on a screen of 0 rows)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # not a terminal, or no file descriptor
        return {"dynamic_ncols": True}
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": size.columns or 80, "nrows": size.lines or 24}


class ByteBar:
    """A tqdm bar in bytes, created on the first `grow` (when the total is first known).

    Use it as a context manager; `grow` adds to the total (each planned part of the work),
    `update` counts bytes done. A bar that is not shown does nothing at all.

    Examples:
        >>> import io, contextlib
        >>> err = io.StringIO()
        >>> with contextlib.redirect_stderr(err), ByteBar("saving", progress=True) as bar:
        ...     bar.grow(560)
        ...     bar.update(500)
        ...     bar.update(60)
        >>> "560B/560B" in err.getvalue()
        True
    """

    def __init__(self, desc: str, *, progress: bool | None, main: bool = True) -> None:
        self.desc = desc
        self.shown = is_shown(progress, main=main)
        self.delay = 0.0 if progress else AUTO_DELAY_S
        self.bar: Any = None

    def grow(self, nbytes: int) -> None:
        """Add ``nbytes`` to the total (the bar appears, unless ``delay`` holds it back)."""
        if not self.shown or (self.bar is None and nbytes == 0):
            return
        if self.bar is None:
            self.bar = tqdm(total=nbytes, desc=self.desc, unit="B", unit_scale=True,
                            file=sys.stderr, delay=self.delay, bar_format=_FORMAT,
                            **_screen(sys.stderr))
        else:
            self.bar.total += nbytes
            self.bar.refresh()

    def update(self, nbytes: int) -> None:
        """Count ``nbytes`` done."""
        if self.bar is not None and nbytes:
            self.bar.update(nbytes)

    def close(self) -> None:
        """End the bar (its last line stays on screen)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> ByteBar:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
