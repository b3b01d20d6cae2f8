"""The first code every launched rank runs: run the target, record its traceback on failure.

``python -m distlib.launcher._bootstrap callable PAYLOAD RESULTS`` runs a pickled callable and
stores its return value; ``script PATH ARGS...`` and ``module NAME ARGS...`` run a script or a
module as ``__main__``, like ``python PATH`` / ``python -m NAME``. When the target raises, the
traceback goes to the error file torch's elastic agent gave this rank, so the launcher can
print it once as the job's root cause. A rank whose console went away (``distlib launch
x.py | head``: the reader closed the pipe) ends quietly instead, as ``yes | head`` does.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import runpy
import select
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from types import FrameType
from typing import Any

from distlib.launcher._hang import describe, watch_rank, write_json
from distlib.launcher._payload import dumps, loads

__all__ = ["CONSOLE_CLOSED_EXIT", "console_closed", "main"]

# The exit code of a rank whose console went away: a shell's for a process SIGPIPE ended.
CONSOLE_CLOSED_EXIT = 128 + signal.SIGPIPE


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (no orphans after a SIGKILL).

    Effects: sets the process's parent-death signal (Linux only; elsewhere nothing).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "remote worker",
               "Broken pipe", "DistNetworkError", "DistBackendError", "DistStoreError")


def is_secondary(exc: BaseException) -> bool:
    """True when the exception says a *peer* died (so another rank holds the root cause).

    Python's own ``BrokenPipeError`` counts only when torch.distributed raised it: a pipe of
    the script's own that lost its reader is the script's failure.
    """
    if isinstance(exc, BrokenPipeError) and not _raised_in_torch_distributed(exc):
        return False
    text = f"{type(exc).__name__}: {exc}"
    return any(sign in text for sign in _PEER_SIGNS)


def _raised_in_torch_distributed(exc: BaseException) -> bool:
    inside = os.path.join("torch", "distributed", "")
    return any(inside in frame.filename for frame in traceback.extract_tb(exc.__traceback__))


_TIMEOUT_SIGNS = re.compile(r"timed out|timeout|DistTimeoutError", re.IGNORECASE)


def is_timeout(exc: BaseException) -> bool:
    """True when torch.distributed says a wait ran out of time (a collective, the rendezvous).

    A timeout of the user's own code (an HTTP request) is an ordinary failure: only an
    exception raised through torch.distributed counts.
    """
    if not _TIMEOUT_SIGNS.search(f"{type(exc).__name__}: {exc}"):
        return False
    return _raised_in_torch_distributed(exc)


def _where(exc: BaseException) -> tuple[str, str]:
    """Where the exception was raised, as `distlib.launcher._hang.describe` words it."""
    frames = [(f.filename, f.lineno or 0, f.name) for f in traceback.extract_tb(exc.__traceback__)]
    return describe(frames)


def _rank_folder() -> str | None:
    """The folder torch's agent gave this rank (its error file's), where it leaves records."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    return os.path.dirname(path) if path else None


def _note(name: str, data: dict[str, Any]) -> None:
    """Leave a record (``start.json``, ``finished.json``) for the agent in the rank's folder."""
    folder = _rank_folder()
    if folder:
        with contextlib.suppress(OSError):
            write_json(os.path.join(folder, name), data)


def _record(exc: BaseException, rank: str | None = None) -> None:
    """Write the traceback in torch's error-file format (plus a precise timestamp)."""
    tb = exc.__traceback__
    own = (os.path.abspath(__file__), os.path.abspath(runpy.__file__), "<frozen runpy>")
    while tb is not None and tb.tb_next is not None and (
            tb.tb_frame.f_code.co_filename in own
            or os.path.abspath(tb.tb_frame.f_code.co_filename) in own):
        tb = tb.tb_next  # the user's frames are the story; the bootstrap's are noise
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        sys.stderr.write(text)
        return
    where, collective = _where(exc)
    data = {"message": {"message": f"{type(exc).__name__}: {exc}",
                        "extraInfo": {"py_callstack": text, "timestamp": str(int(time.time())),
                                      "distlib_time_ns": str(time.time_ns()),
                                      "distlib_secondary": is_secondary(exc),
                                      "distlib_timeout": is_timeout(exc),
                                      "distlib_where": where,
                                      "distlib_collective": collective,
                                      "distlib_rank": rank or os.environ.get("RANK", "0"),
                                      "distlib_attempt": os.environ.get(
                                          "TORCHELASTIC_RESTART_COUNT", "0")}}}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)


def _run_callable(payload_path: str, results_dir: str, rank: str) -> None:
    with open(payload_path, "rb") as handle:
        target, args = loads(handle.read())
    value = target(*args)
    path = os.path.join(results_dir, f"{rank}.pkl")
    with open(path + ".tmp", "wb") as handle:
        handle.write(dumps(value))
    os.replace(path + ".tmp", path)


def _run_script(path: str, args: Sequence[str]) -> None:
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(path))
    runpy.run_path(path, run_name="__main__")


def _run_module(name: str, args: Sequence[str]) -> None:
    sys.argv = [name, *args]
    runpy.run_module(name, run_name="__main__", alter_sys=True)


def _run(kind: str, rest: Sequence[str], rank: str) -> None:
    if kind == "callable":
        _run_callable(rest[0], rest[1], rank)
    elif kind == "script":
        _run_script(rest[0], rest[1:])
    elif kind == "module":
        _run_module(rest[0], rest[1:])
    else:
        msg = f"distlib bootstrap: unknown target kind {kind!r}"
        raise SystemExit(msg)


class _ReplicaFailed(Exception):
    """An XLA replica raised; its traceback is already recorded."""


def _replica(index: int, kind: str, rest: Sequence[str]) -> None:
    """One ``xmp.spawn`` replica (a thread or a process): run the target as rank ``index``."""
    try:
        _run(kind, rest, str(index))
    except SystemExit:
        raise
    except BaseException as exc:
        _record(exc, str(index))
        raise _ReplicaFailed(str(index)) from None


# The agent's rank variables for this one host process; the replicas' ranks come from
# torch_xla's runtime instead (`detect()` asks it when these are absent).
_HOST_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                        "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE")


def _run_xla_replicas(kind: str, rest: Sequence[str], replicas: str) -> int:
    """Start the target in torch_xla's replicas (``xmp.spawn``: the device count sets how many).

    Effects: removes the agent's rank variables from this process's environment (it is the
    launcher's process; the replicas must not read them).
    """
    try:
        import torch_xla.distributed.xla_multiprocessing as xmp
    except ImportError as exc:  # the root cause: no (or a broken) torch_xla on this machine
        _record(exc)
        return 1
    for name in _HOST_RANK_VARIABLES:
        os.environ.pop(name, None)
    try:
        xmp.spawn(_replica, args=(kind, list(rest)), nprocs=1 if replicas == "1" else None)
    except _ReplicaFailed:
        return 1
    except SystemExit:
        raise
    except BaseException as exc:  # e.g. BrokenProcessPool: a replica process died
        _record(exc)
        return 1
    return 0


def _watch(rank: str) -> Any:
    """Answer the launcher's stack requests; watch for stalls when it asked (see `_hang`)."""
    folder = _rank_folder()
    if not folder:
        return None
    _note("start.json", {"rank": int(rank), "pid": os.getpid(),
                         "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))})
    stall = os.environ.get("DISTLIB_STALL_TIMEOUT")
    return watch_rank(folder, rank, float(stall) if stall else None)


def whole_lines() -> None:
    """Make each line this rank prints reach stdout or stderr in one write.

    Ranks run unbuffered (``python -u``), so ``print`` hands over its text and its newline in
    separate writes, and another rank's line can land in between: ``{"rank": 0{"rank": 1}``.
    Line buffering keeps ``print`` prompt (the line goes out at its newline) and the line whole
    (one write, which a pipe keeps in one piece up to ``PIPE_BUF``).

    Effects: reconfigures ``sys.stdout`` and ``sys.stderr`` of this process.
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):  # a closed or foreign stream
                reconfigure(line_buffering=True, write_through=False)


def console_closed() -> bool:
    """True when this process's stdout or stderr is a pipe whose reader has gone away.

    Linux and macOS report an error condition (``POLLERR``) on the write end of a pipe with no
    reader left; a file, a terminal or a live pipe report none.

    Example:
        >>> console_closed()  # a test's stdout: a file or a live pipe
        False
    """
    poll = select.poll()
    for fd in (1, 2):
        with contextlib.suppress(OSError, ValueError):
            poll.register(fd, select.POLLOUT)
    with contextlib.suppress(OSError):
        return any(events & select.POLLERR for _, events in poll.poll(0))
    return False


def _end_quietly(rank: str) -> int:
    """End a rank whose console went away: no traceback, and none at exit when Python
    flushes what is still buffered; the agent learns why from the rank's note.

    Effects: points this process's file descriptors 1 and 2 at /dev/null; leaves a record.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
    _note("console_closed.json", {"rank": int(rank)})
    return CONSOLE_CLOSED_EXIT


def main(argv: Sequence[str]) -> int:
    """Run one rank's target; return its exit code."""
    die_with_parent()
    whole_lines()
    kind, rest = argv[0], list(argv[1:])
    replicas = os.environ.get("DISTLIB_XLA_REPLICAS")
    if replicas:
        return _run_xla_replicas(kind, rest, replicas)
    # RANK is the agent's protocol with this bootstrap (user code reads it via detect()).
    rank = os.environ.get("RANK", "0")
    keep = _watch(rank)
    finished: list[bool] = []
    atexit.register(_close_groups, finished)  # first registered, so it runs after the script's
    try:
        _run(kind, rest, rank)
    except SystemExit as exc:
        if exc.code in (0, None):
            finished.append(True)
            _note("finished.json", {"rank": int(rank), "time_ns": time.time_ns()})
        raise
    except BrokenPipeError as exc:
        if console_closed():
            return _end_quietly(rank)
        _record(exc)
        return 1
    except BaseException as exc:
        _record(exc)
        return 1
    finished.append(True)
    _note("finished.json", {"rank": int(rank), "time_ns": time.time_ns()})
    del keep
    return 0


def _close_groups(finished: Sequence[bool]) -> None:
    """At the exit of a rank whose target finished: destroy its torch.distributed groups.

    A process that ends with a gloo group still open can abort in the interpreter's teardown
    (``terminate called without an active exception``, SIGABRT: torch's worker threads outlive
    the interpreter), now and then, most often while a peer still sends to it. This runs after
    the script's own atexit handlers and its non-daemon threads (an async save), and only for
    a finished target: a failed rank leaves its groups alone, as closing them could wait on a
    peer.

    Effects: destroys this process's torch.distributed groups.
    """
    dist = sys.modules.get("torch.distributed")
    if finished and dist is not None and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group()


def apply_threads(value: str | None) -> None:
    """Give this forked rank's torch the thread counts a fresh interpreter would read.

    torch reads ``OMP_NUM_THREADS`` once, when it is imported; a rank forked from the agent
    inherits the agent's torch, imported before the variable was set, so without this every
    rank would run one thread per core of the machine.

    Effects: sets torch's intra-op and inter-op thread counts of this process.
    """
    if not value or not value.strip().isdigit() or int(value) < 1:
        return
    import torch

    torch.set_num_threads(int(value))
    with contextlib.suppress(RuntimeError):  # inter-op work ran in the agent: its pool stays
        torch.set_num_interop_threads(int(value))


def fork_entry(stdin_fd: str, *argv: str) -> None:
    """Entry point of a rank forked from the agent, which has already imported torch.

    Forking skips one torch import per rank (seconds). The rank gets back what a fresh
    interpreter would have: the launcher's stdin (``stdin_fd``, a copy the agent kept, since
    multiprocessing swaps stdin for /dev/null), default signal handlers, its own atexit
    handlers, run at exit, and torch's thread counts from ``OMP_NUM_THREADS``.

    Effects: resets stdin, signal handlers, atexit handlers and torch's thread counts of this
    (forked) process.
    """
    import atexit
    import signal

    if int(stdin_fd) >= 0:
        os.dup2(int(stdin_fd), 0)
        sys.stdin = open(0, encoding=sys.getdefaultencoding(), closefd=False)  # noqa: SIM115

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    atexit._clear()  # the agent's handlers are not this rank's
    apply_threads(os.environ.get("OMP_NUM_THREADS"))
    try:
        code = main(argv)
    except SystemExit as exc:  # sys.exit(0) in the script is a finished rank too
        if exc.code not in (0, None):
            raise
        code = 0
    atexit._run_exitfuncs()
    if code:
        raise SystemExit(code)
    _leave_like_a_process()


def _leave_like_a_process() -> None:
    """End a finished forked rank now, as a spawned one ends when its script returns.

    torch keeps a forked rank alive until every rank has finished (it waits on an event after
    taking the return value), so a peer still waiting in a collective this rank never joins
    would wait for the whole collective timeout. So: close the rank's process groups (their
    sockets), hand torch the return value it waits for, and exit.

    Effects: destroys this process's torch.distributed groups; may end the process.
    """
    _close_groups([True])
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and not (  # torch's _wrap(), which called this rank's entry point
            frame.f_code.co_name == "_wrap" and "ret_val_" in frame.f_locals):
        frame = frame.f_back
    if frame is None:
        return  # another torch: let it end the process its own way
    frame.f_locals["ret_val_"].put(None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
