"""Hang diagnosis: where each rank is, from its Python stack, and when a rank has stalled.

Rank side (started by the bootstrap): `watch_rank` registers `faulthandler` on `STACK_SIGNAL`,
so a signal makes the rank write every thread's Python stack to ``stacks.txt`` in its folder,
even while its main thread is blocked inside a collective in C++; with a stall timeout it also
starts a watcher thread that notices a collective making no progress. Launcher side:
`collect_stacks` signals each live rank and reads its stack; `describe` and `hang_lines`
(pure) turn stacks and tracebacks into one line per rank (``rank 1: train.py:42 in <module>:
time.sleep(600)`` / ``rank 0: train.py:50 waiting in all_reduce``).
"""

from __future__ import annotations

import contextlib
import json
import linecache
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["STACK_SIGNAL", "collect_stacks", "describe", "format_stack", "frames_of_stack",
           "hang_lines", "is_library", "watch_rank", "write_json"]

# The signal that asks a launched rank for its Python stacks (SIGUSR1 is often taken: SLURM
# requeue handlers, Lightning).
STACK_SIGNAL = signal.SIGUSR2
_C10D = os.path.join("torch", "distributed", "distributed_c10d.py")
_LIBRARIES = (os.sep + os.path.join("torch", ""), os.sep + os.path.join("distlib", ""),
              "<frozen ", os.sep + "threading.py", os.sep + "runpy.py",
              os.sep + os.path.join("multiprocessing", ""))
_FRAME = re.compile(r'^\s*File "(?P<file>.*)", line (?P<line>\d+),? in (?P<name>\S+)')
Frame = tuple[str, int, str]  # (file, line, function), outermost first


def write_json(path: str, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a reader never sees half a file).

    Effects: writes and renames a file.
    """
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(dict(data), handle)
    os.replace(path + ".tmp", path)


def frames_of_stack(text: str) -> list[Frame]:
    """The main thread's frames (outermost first) from a faulthandler dump or a traceback.

    Example:
        >>> dump = ('Thread 0x1 (most recent call first):\\n'
        ...         '  File "/x/threading.py", line 9 in run\\n\\n'
        ...         'Current thread 0x2 (most recent call first):\\n'
        ...         '  File "/t/train.py", line 4 in <module>\\n'
        ...         '  File "/s/distlib/launcher/_bootstrap.py", line 80 in main\\n')
        >>> frames_of_stack(dump)
        [('/s/distlib/launcher/_bootstrap.py', 80, 'main'), ('/t/train.py', 4, '<module>')]
    """
    blocks: list[list[Frame]] = [[]]
    recent_first = "most recent call first" in text
    for line in text.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            blocks.append([])
        match = _FRAME.match(line)
        if match:
            blocks[-1].append((match["file"], int(match["line"]), match["name"]))
    blocks = [b[::-1] if recent_first else b for b in blocks if b]
    for block in blocks:  # the rank's main thread runs the bootstrap (or torch's _wrap)
        if any(f.endswith(os.path.join("launch", "_bootstrap.py")) for f, _, _ in block):
            return block
    return blocks[-1] if blocks else []


def is_library(file: str) -> bool:
    """True for a frame of torch, distlib, the interpreter's runners or threading."""
    return any(part in file for part in _LIBRARIES)


def format_stack(frames: Sequence[Frame]) -> str:
    """A stack as a traceback prints it, from the first frame of the user's own code.

    Example:
        >>> print(format_stack([("/s/distlib/launcher/_bootstrap.py", 80, "main"),
        ...                     ("/t/train.py", 4, "<module>")]))
          File "/t/train.py", line 4, in <module>
    """
    first = next((i for i, frame in enumerate(frames) if not is_library(frame[0])), 0)
    return "\n".join(f'  File "{file}", line {line}, in {name}'
                     for file, line, name in frames[first:])


def describe(frames: Sequence[Frame]) -> tuple[str, str]:
    """Where a stack is, as (text, the collective it waits in or "").

    Example:
        >>> describe([("/t/train.py", 50, "<module>"),
        ...           ("/v/torch/distributed/c10d_logger.py", 83, "wrapper"),
        ...           ("/v/torch/distributed/distributed_c10d.py", 3252, "all_reduce")])
        ('train.py:50 waiting in all_reduce', 'all_reduce')
    """
    collective = next((name for file, _, name in frames
                       if file.endswith(_C10D) and not name.startswith("_")), "")
    user = [f for f in frames if not is_library(f[0])]
    file, line, name = user[-1] if user else (frames[-1] if frames else ("?", 0, "?"))
    place = f"{os.path.basename(file)}:{line}"
    if collective:
        return f"{place} waiting in {collective}", collective
    source = linecache.getline(file, line).strip()
    return f"{place} in {name}" + (f": {source}" if source else ""), ""


def collect_stacks(ranks: Mapping[int, tuple[int, str]], *, wait_s: float = 2.0
                   ) -> dict[int, str]:
    """Ask each live rank (rank -> (pid, its folder)) for its stacks; return what came back.

    Effects: sends `STACK_SIGNAL` to each pid and reads ``stacks.txt`` in its folder.
    """
    asked: dict[int, str] = {}
    for rank, (pid, folder) in ranks.items():
        path = os.path.join(folder, "stacks.txt")
        with contextlib.suppress(OSError):
            os.truncate(path, 0)
        try:
            os.kill(pid, STACK_SIGNAL)
        except (ProcessLookupError, PermissionError):
            continue
        asked[rank] = path
    got: dict[int, str] = {}
    deadline = time.monotonic() + wait_s
    while asked and time.monotonic() < deadline:
        time.sleep(0.05)
        for rank, path in list(asked.items()):
            with contextlib.suppress(OSError), open(path, encoding="utf-8",
                                                      errors="replace") as handle:
                text = handle.read()
            if "(most recent call first)" in text:
                time.sleep(0.05)  # faulthandler writes in one go; let it finish
                with open(path, encoding="utf-8", errors="replace") as handle:
                    got[rank] = handle.read()
                del asked[rank]
    return got


def hang_lines(ranks: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """One line per rank (rank -> {"where", "collective", "seq", "state"}), then who holds
    the others up: the ranks that are not in a collective while others wait in one.

    Example:
        >>> hang_lines({0: {"where": "t.py:50 waiting in all_reduce", "collective": "all_reduce",
        ...                 "seq": 3, "state": "timed out"},
        ...             1: {"where": "t.py:42 in <module>: time.sleep(600)", "seq": 2}})
        ... # doctest: +NORMALIZE_WHITESPACE
        ['rank 0: t.py:50 waiting in all_reduce (collective #3; timed out)',
         'rank 1: t.py:42 in <module>: time.sleep(600) (not in a collective; 2 collectives done)',
         'not in a collective while others wait: rank 1 (the likely cause)']
    """
    lines = []
    for rank, info in sorted(ranks.items()):
        seq, state = info.get("seq"), info.get("state", "")
        if info.get("collective"):
            notes = ([f"collective #{seq}"] if seq is not None else []) + ([state] if state else [])
        else:
            notes = ["not in a collective"] + (
                [f"{seq} collectives done"] if seq is not None else []) + (
                [state] if state else [])
        lines.append(f"rank {rank}: {info.get('where') or '(no stack)'}"
                     + (f" ({'; '.join(notes)})" if notes else ""))
    waiting = [r for r, info in ranks.items() if info.get("collective")]
    idle = sorted(r for r, info in ranks.items() if not info.get("collective")
                  and info.get("where"))
    if waiting and idle:
        lines.append("not in a collective while others wait: "
                     + ", ".join(f"rank {r}" for r in idle) + " (the likely cause)")
    return lines


def _sequence_number() -> int | None:
    """How many collectives this rank's default group has issued (None before it exists)."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is None or not dist.is_initialized():
            return None
        group = dist.distributed_c10d._get_default_group()
        return int(group._get_sequence_number_for_group())
    except (RuntimeError, AttributeError, ValueError):
        return None


def _current_collective(main: int) -> tuple[Any, list[Frame]]:
    """The main thread's innermost c10d frame (the call it waits in) and its frames."""
    frame = sys._current_frames().get(main)
    frames: list[Frame] = []
    found = None
    while frame is not None:
        code = frame.f_code
        frames.append((code.co_filename, frame.f_lineno, code.co_name))
        if found is None and code.co_filename.endswith(_C10D):
            found = frame
        frame = frame.f_back
    frames.reverse()
    return (id(found), found.f_code) if found is not None else None, frames


def _watch(folder: str, rank: str, stall_s: float, main: int) -> None:
    """Write ``progress.json`` when the rank enters a new collective, ``stall.json`` when one
    makes no progress for ``stall_s`` seconds (the launcher then reports and stops the job)."""
    period = min(1.0, max(0.05, stall_s / 5))
    key: Any = None
    since = time.monotonic()
    last: tuple[Any, ...] = ()
    while True:
        time.sleep(period)
        found, frames = _current_collective(main)
        seq = _sequence_number()
        now = time.monotonic()
        state = (found, seq)
        if found is None or state != key:
            key, since = state, now
        where, collective = describe(frames)
        if (seq, collective) != last:
            last = (seq, collective)
            with contextlib.suppress(OSError):
                write_json(os.path.join(folder, "progress.json"), {"seq": seq})
        if found is not None and now - since >= stall_s:
            with contextlib.suppress(OSError):
                write_json(os.path.join(folder, "stall.json"),
                           {"rank": int(rank), "where": where, "collective": collective,
                            "seq": seq, "seconds": round(now - since, 1)})
            return


def watch_rank(folder: str, rank: str, stall_s: float | None) -> Iterable[Any]:
    """Make this rank answer `STACK_SIGNAL` with its stacks; with ``stall_s``, watch for stalls.

    Returns what must stay alive while the rank runs (the open stack file).

    Effects: registers a faulthandler signal handler; may start a daemon thread.
    """
    import faulthandler

    handle = open(os.path.join(folder, "stacks.txt"), "w", encoding="utf-8")  # noqa: SIM115
    faulthandler.register(STACK_SIGNAL, file=handle, all_threads=True)
    if stall_s:
        threading.Thread(target=_watch, name="distlib-stall-watch", daemon=True,
                         args=(folder, rank, stall_s, threading.main_thread().ident)).start()
    return (handle,)
