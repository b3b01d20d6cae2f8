"""`launch()`: start N ranks of a callable, script or module on torch's elastic agent.

The caller's process only plans, writes a spec and waits: torch's agent runs in a child
process (`distlib.launcher._agent`) because it writes ``os.environ`` and installs signal
handlers; the caller's environment is left exactly as it was. Each rank starts in
`distlib.launcher._bootstrap`, which returns a callable's value and records tracebacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
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
from distlib.launcher._environ import child_environ
from distlib.launcher._hang import (
    collect_stacks,
    describe,
    format_stack,
    frames_of_stack,
    hang_lines,
)
from distlib.launcher._payload import dumps, loads
from distlib.launcher._start import Agent, start_agent
from distlib.launcher.plan import LaunchPlan, plan_launch, plan_output

__all__ = ["Failure", "LaunchResult", "Outcome", "check_port", "free_port", "launch",
           "launch_plan", "output_note", "prepare_log_dir", "root_cause_message", "run_plan",
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
    timed_out: bool = False  # its exception says a wait ran out of time
    signal: int = 0  # it was killed by this signal before the launcher stopped anything
    where: str = ""  # where it raised: "train.py:50 waiting in all_reduce"
    collective: str = ""  # the collective it was in when it raised, if any
    console_closed: bool = False  # it ended because the reader of its stdout went away


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """How a launch ended, as the agent saw it: the failures, root cause first, and context.

    ``attempts`` has one line per failed attempt of a job with restarts; ``finished`` the
    ranks whose target had returned; ``hang`` the report of a stall or timeout (its reason,
    one line per rank, each live rank's stack); ``stopped_by`` a signal that stopped the job.
    """

    ok: bool
    failures: tuple[Failure, ...] = ()
    stopped_by: str = ""
    attempts: tuple[str, ...] = ()
    finished: tuple[int, ...] = ()
    hang: Mapping[str, Any] | None = field(default=None, hash=False)
    machines: int = 1
    error: str = ""


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


_SIGNAL_HINTS = {"SIGKILL": "out of memory? (see `dmesg`)",
                 "SIGSEGV": "a crash in native code (a C extension, a driver)",
                 "SIGBUS": "a crash in native code (a C extension, a driver)",
                 "SIGABRT": "a native abort (a failed check in C++ code)",
                 "SIGTERM": "stopped from outside the launcher",
                 "SIGINT": "stopped from outside the launcher"}


def _signal_text(number: int) -> str:
    """``9 (SIGKILL) — out of memory? (see `dmesg`)``: a signal, its name and its usual cause.

    Example:
        >>> _signal_text(11)
        'signal 11 (SIGSEGV) — a crash in native code (a C extension, a driver)'
    """
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
    hint = _SIGNAL_HINTS.get(name)
    return f"signal {number} ({name})" + (f" — {hint}" if hint else "")


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _hang_text(call: str, hang: Mapping[str, Any], root: Failure | None) -> str:
    """The report of a stalled or timed-out job: why it ended, where each rank was, stacks."""
    ranks = list(hang.get("ranks") or ([root.rank] if root else []))
    lines = [f"  {line}" for line in hang.get("lines", ())]
    if hang.get("reason") == "stall":
        head = (f"{call}: {_ranks(ranks)} made no progress in a collective for "
                f"{hang.get('seconds')} s (the stall timeout); every rank was stopped.")
    elif hang.get("reason") == "launch timeout":
        head = (f"{call}: the job must finish within timeout_s={hang.get('seconds')}, but it "
                "was still running; every rank was stopped.")
    else:
        head = (f"{call}: {_ranks(ranks)} timed out waiting"
                + (f" in {root.collective}" if root and root.collective else "")
                + "; a timeout is a hang: the rank that timed out is usually not the cause.")
    if not lines:
        lines = ["  (no rank answered with its Python stack: --no-python programs, or ranks "
                 "that had already ended)"]
    text = head + "\nWhere each rank was:\n" + "\n".join(lines) + "\n"
    for rank, stack in sorted(dict(hang.get("stacks", {})).items(), key=lambda kv: int(kv[0])):
        text += f"\nrank {rank} (most recent call last):\n{stack}\n"
    if root is not None and root.traceback and hang.get("reason") == "timeout":
        text += f"\nrank {root.rank}'s error:\n\n{root.traceback.rstrip()}\n"
    return text


def root_cause_message(call: str, failures: Sequence[Failure], signal_name: str = "", *,
                       every_traceback: bool = False, outcome: Outcome | None = None) -> str:
    """The text of a failed launch: the root cause's traceback once, the rest in one line
    (or, with ``every_traceback``, each other rank's traceback after it).

    ``outcome`` adds what the agent saw: a rank killed by a signal, ranks that had finished
    while a peer still waited, a hang report, one line per failed attempt.
    """
    if signal_name:
        return f"{call}: the launch was stopped by {signal_name}; every rank was stopped."
    if outcome is not None and outcome.error:
        return f"{call}: {outcome.error}"
    attempts = "".join(f"{call}: {line}\n" for line in (outcome.attempts if outcome else ()))
    if outcome is not None and outcome.hang:
        return attempts + _hang_text(call, outcome.hang, failures[0] if failures else None)
    if not failures:
        return attempts + f"{call}: the launch failed without a rank failure (see the agent's output)."
    root, others = failures[0], failures[1:]
    detail = root.traceback.rstrip() or root.message
    finished = [r for r in (outcome.finished if outcome else ()) if r != root.rank]
    if root.signal:
        text = (f"{call}: rank {root.rank} was killed by {_signal_text(root.signal)}; this "
                "is the root cause (a signal ends a process without a Python traceback).\n")
    elif root.secondary and finished:
        waited = (f"{root.collective} at {root.where.split(' ')[0]}" if root.collective
                  else "a collective")
        text = (f"{call}: rank {root.rank} failed with exit code {root.exitcode} after losing "
                f"a peer: {_ranks(finished)} had finished (its target returned) while rank "
                f"{root.rank} still waited in {waited}, which {_ranks(finished)} never "
                f"joined:\n\n{detail}\n")
    elif root.secondary and (outcome is None or outcome.machines > 1):
        text = (f"{call}: rank {root.rank} failed with exit code {root.exitcode} after losing "
                f"a peer; the root cause is on another machine (see its launcher):\n\n"
                f"{detail}\n")
    elif root.secondary:
        text = (f"{call}: rank {root.rank} failed with exit code {root.exitcode} after losing "
                "a peer, and no rank of this job said why (a peer that ended without a "
                f"traceback, e.g. os._exit()):\n\n{detail}\n")
    else:
        text = (f"{call}: rank {root.rank} failed with exit code {root.exitcode}; this is the "
                f"root cause:\n\n{detail}\n")
    if others:
        rest = ", ".join(f"rank {f.rank} (exit code {f.exitcode})" for f in others)
        text += f"\nAlso stopped or failed after it: {rest}."
    for other in others if every_traceback else ():
        text += f"\n\nrank {other.rank}:\n{(other.traceback or other.message).rstrip()}"
    return attempts + text


def check_port(plan: LaunchPlan) -> None:
    """Refuse a busy main port on the machine that hosts the rendezvous, before anything starts.

    Raises:
        LaunchError: ``plan.main_port`` is in use on ``plan.main_address`` (this machine).

    Example:
        >>> check_port(LaunchPlan(main_port=0))  # 0: a free port is picked later

    Effects: binds and closes a socket (when this machine hosts the rendezvous).
    """
    if plan.main_port == 0 or plan.machine_rank != 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store binds
        try:
            sock.bind((plan.main_address, plan.main_port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return  # not an address of this machine (or not IPv4): the agent will tell
            msg = (f"launch(): main_port must be free on machine 0, but port {plan.main_port} "
                   f"on {plan.main_address} is in use; pick another or use 0 (a free port).")
            raise LaunchError(msg) from None


def prepare_log_dir(plan: LaunchPlan) -> LaunchPlan:
    """Create ``plan.log_dir`` (an absolute path from here on) before anything starts.

    Raises:
        LaunchError: the folder cannot be created or written; the message says why.

    Example:
        >>> prepare_log_dir(LaunchPlan()).log_dir is None
        True

    Effects: creates the folder (and its parents).
    """
    if plan.log_dir is None:
        return plan
    path = os.path.abspath(os.path.expanduser(plan.log_dir))
    why = ""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        why = "a file of that name is in the way"
    except OSError as error:
        why = error.strerror or type(error).__name__
        if isinstance(error, NotADirectoryError):
            why += " (a file stands where a parent folder should be)"
    if not why and not os.access(path, os.W_OK | os.X_OK):
        why = "the folder is not writable"
    if why:
        msg = (f"launch(): log_dir must be a folder that can be created and written, but got "
               f"{plan.log_dir!r}: {why}. Pass another --log-dir (log_dir=), or leave it out.")
        raise LaunchError(msg)
    return dataclasses.replace(plan, log_dir=path)


def output_note(plan: LaunchPlan, call: str) -> str:
    """The launcher's note on where the ranks' output goes ('' when nothing is redirected).

    Example:
        >>> print(output_note(LaunchPlan(nproc_per_node=2, ranks_filter="1", log_dir="/l"), "x"))
        x: each rank's output also goes to /l/rank_N.log; the console shows rank 1 only.
    """
    out = plan_output(plan, plan.world_size)
    notes = []
    if plan.log_dir is not None:
        notes.append(f"each rank's output also goes to {os.path.join(plan.log_dir, 'rank_N.log')}")
    if out.console is not None:
        shown = _ranks(out.console)
        notes.append(f"the console shows {shown} only" + (
            "" if plan.log_dir else
            "; the other ranks' output is not kept (pass --log-dir DIR to keep it)"))
    if out.console_streams != 3:
        hidden = {0: "stdout and stderr", 1: "stderr", 2: "stdout"}[out.console_streams]
        notes.append(f"the ranks' {hidden} go to the log files only (--redirects)")
    return f"{call}: " + "; ".join(notes) + "." if notes else ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the agent (it stops its ranks), then SIGKILL its process group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _collect_hang(log_dir: str, timeout_s: float | None) -> dict[str, Any]:
    """Where each rank of the latest attempt is, asked before the job is stopped."""
    starts: dict[int, tuple[int, tuple[int, str]]] = {}
    for path in glob.glob(os.path.join(log_dir, "*", "attempt_*", "*", "start.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            attempt, rank = int(data["attempt"]), int(data["rank"])
            if rank not in starts or starts[rank][0] <= attempt:
                starts[rank] = (attempt, (int(data["pid"]), os.path.dirname(path)))
    stacks = collect_stacks({rank: where for rank, (_, where) in starts.items()})
    info: dict[int, dict[str, Any]] = {}
    texts: dict[str, str] = {}
    for rank, text in stacks.items():
        frames = frames_of_stack(text)
        where, collective = describe(frames)
        info[rank] = {"where": where, "collective": collective}
        texts[str(rank)] = format_stack(frames)
    return {"reason": "launch timeout", "lines": hang_lines(info), "stacks": texts,
            "seconds": timeout_s}


def run_plan(plan: LaunchPlan, command: Sequence[str], *, environ: Mapping[str, str],
             work_dir: str, timeout_s: float | None = None,
             agent: Agent | None = None, call: str = "launch()") -> Outcome:
    """Run the agent for ``plan`` and wait; return how the job ended.

    ``environ`` becomes the agent's whole environment (the ranks inherit it). ``agent`` is
    one `start_agent` started earlier, else one is started here.

    Raises:
        LaunchError: the job ran past ``timeout_s`` (the message says where each rank was),
            or ``plan.log_dir`` cannot be created.

    Effects: creates ``plan.log_dir``; prints where the ranks' output goes (unless
    ``plan.quiet``); starts the agent process (which starts the ranks); on timeout, Ctrl-C or
    SIGTERM stops it and every rank before returning or re-raising; on timeout it first asks
    every rank for its Python stack.
    """
    plan = prepare_log_dir(plan)
    note = "" if plan.quiet else output_note(plan, call)
    if note:
        print(note, file=sys.stderr, flush=True)
    outcome_path = os.path.join(work_dir, "outcome.json")
    log_dir = os.path.join(work_dir, "logs")
    spec = {"plan": dataclasses.asdict(plan), "command": list(command),
            "outcome": outcome_path, "log_dir": log_dir, "environ": dict(environ),
            "call": call}
    agent = agent if agent is not None else start_agent(environ)
    proc = agent.process
    try:
        agent.send(json.dumps(spec).encode())
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        hang = _collect_hang(log_dir, timeout_s)
        _stop(proc)
        raise LaunchError(root_cause_message(call, [], outcome=Outcome(
            ok=False, hang=hang))) from None
    except BaseException:
        _stop(proc)
        raise
    if not os.path.exists(outcome_path):
        return Outcome(ok=False, stopped_by=f"agent exit code {proc.returncode}")
    with open(outcome_path, encoding="utf-8") as handle:
        data = json.load(handle)
    return Outcome(ok=bool(data["ok"]), failures=tuple(Failure(**f) for f in data["failures"]),
                   stopped_by=data.get("signal", ""), attempts=tuple(data.get("attempts", ())),
                   finished=tuple(data.get("finished", ())), hang=data.get("hang"),
                   machines=int(data.get("machines", plan.max_machines)),
                   error=data.get("error", ""))


def _command(target: Any, args: Sequence[Any], work_dir: str) -> tuple[list[str], bool]:
    """The worker command line, and whether the target returns values."""
    boot = [sys.executable, "-u", "-m", "distlib.launcher._bootstrap"]
    if callable(target):
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
        target: a callable (shipped with cloudpickle: by reference when importable; what
            ``__main__`` defines — a notebook, a REPL — by value), a script path or a module name.
        *args: positional arguments for a callable (use ``functools.partial`` for keyword
            arguments), or command-line arguments for a script or module.
        num_processes: the total number of ranks across machines (default: visible GPUs,
            else 1).
        timeout_s: stop the whole job and raise after this many seconds (default: no limit);
            the message says where each rank was (its Python stack, asked before stopping).
        environ: the environment the ranks start from (default ``os.environ``; never written).
        **options: the other `LaunchPlan` fields: ``nproc_per_node``, ``num_machines``
            (``2`` or ``"1:4"``), ``machine_rank``, ``main_address``, ``main_port`` (0 picks
            a free one), ``rdzv_backend`` (``"static"``, ``"c10d"``), ``max_restarts``,
            ``monitor_interval_s``, ``cpu``, ``gpu_ids``, ``precision``, ``strategy``,
            ``strategy_options``, ``debug``, ``collective_timeout_s`` (the rendezvous and
            each collective; default `DEFAULT_TIMEOUT_S`, 1800 s), ``stall_timeout_s`` (stop
            with a report of where each rank is when one waits that long in a collective),
            ``run_id``, ``start_method`` (``"auto"``: fork ranks from the agent when no GPU
            is used), ``mesh`` (a `distlib.topology.Mesh`, ``"dp_shard=2,tp=2"`` or
            ``{"tp": 2}``: every rank's ``Env.mesh``; refused before anything starts when its
            sizes do not multiply to the number of processes); the ranks' output:
            ``log_dir`` (each rank's stdout and stderr also go to ``log_dir/rank_N.log``),
            ``ranks_filter`` (``0``, ``"0,2"`` or ``[0, 2]``: the ranks the console shows),
            ``rank_prefix`` (``[rank N] `` before each line; default: on when one of the
            others captures the output and several ranks run), ``tee``/``redirects``
            (torch's stream numbers, 1 stdout, 2 stderr, 3 both: what the log files get,
            what they alone get), ``quiet`` (no launcher notes).

    Returns:
        A `LaunchResult`; for a callable, ``result[rank]`` is what that rank returned.

    Raises:
        ConfigError: the options contradict each other (or ``ranks_filter`` names a rank
            that will not exist).
        LaunchError: ``log_dir`` cannot be created; a rank failed (the message holds its traceback, or the signal that
            killed it), the job was stopped, it hung (a stall or a collective timeout: where
            each rank was), or it ran past ``timeout_s``; with restarts, one line per failed
            attempt comes first. A busy ``main_port`` is refused before anything starts.

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
    check_port(plan)
    if plan.main_port == 0:
        plan = dataclasses.replace(plan, main_port=free_port())
    base = dict(os.environ if environ is None else environ)
    prefixes = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    env = child_environ(base, plan, sys_path=sys.path, cwd=os.getcwd(), skip_prefixes=prefixes)
    work_dir = tempfile.mkdtemp(prefix="distlib-launch-")
    try:
        command, returns = _command(target, args, work_dir)
        outcome = run_plan(plan, command, environ=env, work_dir=work_dir,
                           timeout_s=timeout_s)
        if not outcome.ok:
            raise LaunchError(root_cause_message("launch()", outcome.failures,
                                                 outcome.stopped_by, every_traceback=plan.debug,
                                                 outcome=outcome))
        values: dict[int, Any] = {}
        if returns:
            results = os.path.join(work_dir, "returns")
            for name in os.listdir(results):
                if name.endswith(".pkl"):
                    with open(os.path.join(results, name), "rb") as handle:
                        values[int(name[:-4])] = loads(handle.read())
        return LaunchResult(returns=values, duration_s=time.monotonic() - start)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
