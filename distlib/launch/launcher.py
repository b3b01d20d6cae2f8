"""`launch()`: start N ranks of a callable, script or module on torch's elastic agent.

The caller's process only plans, writes a spec and waits: torch's agent runs in a child
process (`distlib.launch._agent`) because it writes ``os.environ`` and installs signal
handlers; the caller's environment is left exactly as it was. Each rank starts in
`distlib.launch._bootstrap`, which returns a callable's value and records tracebacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from distlib.errors import LaunchError
from distlib.launch._environ import child_environ
from distlib.launch._start import Agent, start_agent
from distlib.launch.plan import LaunchPlan, plan_launch

__all__ = ["Failure", "LaunchResult", "free_port", "launch", "launch_plan", "run_plan",
           "start_agent"]

_STOP_GRACE_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """One rank that failed: its exit code and, when it raised, its traceback."""

    rank: int
    exitcode: int
    traceback: str = ""
    message: str = ""
    secondary: bool = False  # it only reports a lost peer


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchResult:
    """What a successful launch returns: each rank's return value (callables only).

    Index it by global rank; iterate for the values in rank order. On a multi-machine job
    only this machine's ranks are present.

    Example:
        >>> result = LaunchResult(returns={0: "a", 1: "b"}, duration_s=3.0)
        >>> result[1], list(result), len(result)
        ('b', ['a', 'b'], 2)
    """

    returns: Mapping[int, Any] = field(default_factory=dict, hash=False)
    duration_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "returns", dict(sorted(self.returns.items())))

    def __getitem__(self, rank: int) -> Any:
        return self.returns[rank]

    def __len__(self) -> int:
        return len(self.returns)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.returns.values())


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (the OS picks it).

    Example:
        >>> 0 < free_port() < 65536
        True

    Effects: binds and closes a socket.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def root_cause_message(call: str, failures: Sequence[Failure], signal_name: str = "", *,
                       every_traceback: bool = False) -> str:
    """The text of a failed launch: the root cause's traceback once, the rest in one line
    (or, with ``every_traceback``, each other rank's traceback after it)."""
    if signal_name:
        return f"{call}: the launch was stopped by {signal_name}; every rank was stopped."
    if not failures:
        return f"{call}: the launch failed without a rank failure (see the agent's output)."
    root, others = failures[0], failures[1:]
    detail = root.traceback.rstrip() or root.message
    if root.secondary:
        text = (f"{call}: rank {root.rank} failed with exit code {root.exitcode} after losing "
                f"a peer; the root cause is on another machine (see its launcher):\n\n"
                f"{detail}\n")
    else:
        text = (f"{call}: rank {root.rank} failed with exit code {root.exitcode}; this is the "
                f"root cause:\n\n{detail}\n")
    if others:
        rest = ", ".join(f"rank {f.rank} (exit code {f.exitcode})" for f in others)
        text += f"\nAlso stopped or failed after it: {rest}."
    for other in others if every_traceback else ():
        text += f"\n\nrank {other.rank}:\n{(other.traceback or other.message).rstrip()}"
    return text


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the agent (it stops its ranks), then SIGKILL its process group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_plan(plan: LaunchPlan, command: Sequence[str], *, environ: Mapping[str, str],
             work_dir: str, timeout_s: float | None = None,
             agent: Agent | None = None) -> tuple[bool, list[Failure], str]:
    """Run the agent for ``plan`` and wait; return (ok, failures root cause first, signal).

    ``environ`` becomes the agent's whole environment (the ranks inherit it). ``agent`` is
    one `start_agent` started earlier, else one is started here.

    Effects: starts the agent process (which starts the ranks); on timeout, Ctrl-C or
    SIGTERM stops it and every rank before returning or re-raising.
    """
    outcome_path = os.path.join(work_dir, "outcome.json")
    spec = {"plan": dataclasses.asdict(plan), "command": list(command),
            "outcome": outcome_path, "log_dir": os.path.join(work_dir, "logs"),
            "environ": dict(environ)}
    agent = agent if agent is not None else start_agent(environ)
    proc = agent.process
    try:
        agent.send(json.dumps(spec).encode())
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        msg = (f"launch(): the job must finish within timeout_s={timeout_s}, but it was still "
               "running; every rank was stopped. Raise timeout_s, or look for a rank that "
               "waits in a collective the others never reach.")
        raise LaunchError(msg) from None
    except BaseException:
        _stop(proc)
        raise
    if not os.path.exists(outcome_path):
        return False, [], f"agent exit code {proc.returncode}"
    with open(outcome_path, encoding="utf-8") as handle:
        outcome = json.load(handle)
    failures = [Failure(**f) for f in outcome["failures"]]
    return bool(outcome["ok"]), failures, outcome.get("signal", "")


def _command(target: Any, args: Sequence[Any], work_dir: str) -> tuple[list[str], bool]:
    """The worker command line, and whether the target returns values."""
    boot = [sys.executable, "-u", "-m", "distlib.launch._bootstrap"]
    if callable(target):
        from distlib.launch._payload import dumps

        payload = os.path.join(work_dir, "payload.pkl")
        with open(payload, "wb") as handle:
            handle.write(dumps((target, tuple(args))))
        results = os.path.join(work_dir, "returns")
        os.makedirs(results)
        return [*boot, "callable", payload, results], True
    if not isinstance(target, str) or not target:
        msg = (f"launch(): target must be a callable, a script path or a module name, but "
               f"got {target!r}.")
        raise LaunchError(msg)
    kind = "script" if target.endswith(".py") or os.path.isfile(target) else "module"
    return [*boot, kind, target, *map(str, args)], False


def launch(target: Callable[..., Any] | str, *args: Any, num_processes: int | None = None,
           timeout_s: float | None = None, environ: Mapping[str, str] | None = None,
           **options: Any) -> LaunchResult:
    """Run ``target`` in ``num_processes`` ranks and return each rank's result.

    Args:
        target: a callable (pickled by reference; functions defined in ``__main__`` — a REPL,
            a notebook — travel as code), a script path (``.py``) or a module name.
        *args: positional arguments for a callable (use ``functools.partial`` for keyword
            arguments), or command-line arguments for a script or module.
        num_processes: the total number of ranks across machines (default: visible GPUs,
            else 1).
        timeout_s: stop the whole job and raise after this many seconds (default: no limit).
        environ: the environment the ranks start from (default ``os.environ``; never written).
        **options: the other `LaunchPlan` fields: ``nproc_per_node``, ``num_machines``
            (``2`` or ``"1:4"``), ``machine_rank``, ``main_address``, ``main_port`` (0 picks
            a free one), ``rdzv_backend`` (``"static"``, ``"c10d"``), ``max_restarts``,
            ``monitor_interval_s``, ``cpu``, ``gpu_ids``, ``precision``, ``strategy``,
            ``strategy_options``, ``debug``, ``collective_timeout_s``, ``run_id``,
            ``start_method`` (``"auto"``: fork ranks from the agent when no GPU is used).

    Returns:
        A `LaunchResult`; for a callable, ``result[rank]`` is what that rank returned.

    Raises:
        ConfigError: the options contradict each other.
        LaunchError: a rank failed (the message holds its traceback), the job was stopped,
            or it ran past ``timeout_s``.

    Example:
        >>> import operator
        >>> launch(operator.add, 2, 3, num_processes=2, cpu=True, timeout_s=180)[1]  # doctest: +SKIP
        5

    Effects: starts an agent process and the ranks; creates and removes a temporary
    directory. The caller's ``os.environ`` is only read.
    """
    plan = plan_launch(num_processes=num_processes, **options)
    return launch_plan(plan, target, *args, timeout_s=timeout_s, environ=environ)


def launch_plan(plan: LaunchPlan, target: Callable[..., Any] | str, *args: Any,
                timeout_s: float | None = None,
                environ: Mapping[str, str] | None = None) -> LaunchResult:
    """`launch` for an already built `LaunchPlan` (the CLI's ``distlib test`` uses it).

    Effects: as `launch`.
    """
    start = time.monotonic()
    if plan.main_port == 0:
        plan = dataclasses.replace(plan, main_port=free_port())
    base = dict(os.environ if environ is None else environ)
    prefixes = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    env = child_environ(base, plan, sys_path=sys.path, cwd=os.getcwd(), skip_prefixes=prefixes)
    work_dir = tempfile.mkdtemp(prefix="distlib-launch-")
    try:
        command, returns = _command(target, args, work_dir)
        ok, failures, stopped_by = run_plan(plan, command, environ=env, work_dir=work_dir,
                                            timeout_s=timeout_s)
        if not ok:
            raise LaunchError(root_cause_message("launch()", failures, stopped_by,
                                                 every_traceback=plan.debug))
        values: dict[int, Any] = {}
        if returns:
            from distlib.launch._payload import loads

            results = os.path.join(work_dir, "returns")
            for name in os.listdir(results):
                if name.endswith(".pkl"):
                    with open(os.path.join(results, name), "rb") as handle:
                        values[int(name[:-4])] = loads(handle.read())
        return LaunchResult(returns=values, duration_s=time.monotonic() - start)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
