"""The agent process: torch's elastic agent started for one machine's share of a launch.

``python -m distlib.launcher._agent SPEC.json`` reads a spec written by the launcher (the plan,
the worker command, where to write the outcome), runs torch's ``elastic_launch`` — which
starts, monitors, stops and restarts the ranks — and writes the outcome as JSON: either
success, or each failed rank's exit code and traceback. Torch's agent writes ``os.environ``
and installs signal handlers, which is why it runs here and not in the caller's process.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from distlib.errors import ConfigError
from distlib.launcher._bootstrap import die_with_parent, fork_entry
from distlib.launcher._environ import rank_threads
from distlib.launcher._hang import (
    collect_stacks,
    describe,
    format_stack,
    frames_of_stack,
    hang_lines,
)
from distlib.launcher.plan import (
    DEFAULT_TIMEOUT_S,
    LaunchPlan,
    OutputPlan,
    plan_output,
    resolve_mesh,
)

__all__ = ["main"]


def _nproc(plan: LaunchPlan) -> int:
    # XLA: one process per machine; torch_xla starts the replicas in it (xmp.spawn) or, under
    # SPMD, that one process drives every device.
    return 1 if plan.strategy == "xla" else plan.nproc_per_node or _visible_gpus(plan) or 1


def _num_cpus() -> int:
    """The cores this process may run on: physical cores, within its CPU affinity."""
    import psutil

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    return min(cores, allowed) if allowed else cores


def _launch_config(plan: LaunchPlan, log_dir: str, start_method: str,
                   capture: bool = False) -> Any:
    """torch's ``LaunchConfig`` for ``plan``; with ``capture`` every rank's stdout and stderr
    go to files under ``log_dir`` (torch's redirects, for forked and spawned ranks alike),
    which `_Tails` reads back to the console and the user's log files."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig

    nproc = _nproc(plan)
    timeout = plan.collective_timeout_s or DEFAULT_TIMEOUT_S  # one default for both waits
    configs: dict[str, Any] = {"timeout": timeout}
    if plan.rdzv_backend == "c10d":
        configs["join_timeout"] = timeout
    if plan.rdzv_backend == "static":
        configs["rank"] = plan.machine_rank
    elif plan.max_machines > 1:
        configs["is_host"] = plan.machine_rank == 0
    # shutdown_timeout is newer than torch 2.9 (the XLA session's torch): pass it where it exists.
    extra: dict[str, Any] = ({"shutdown_timeout": 5} if "shutdown_timeout" in getattr(
        LaunchConfig, "__dataclass_fields__", {}) else {})
    return LaunchConfig(
        min_nodes=plan.min_machines, max_nodes=plan.max_machines, nproc_per_node=nproc,
        run_id=plan.run_id, role="rank", rdzv_backend=plan.rdzv_backend,
        rdzv_endpoint=f"{plan.main_address}:{plan.main_port}", rdzv_configs=configs,
        max_restarts=plan.max_restarts, monitor_interval=plan.monitor_interval_s,
        start_method=start_method, **extra,
        logs_specs=DefaultLogsSpecs(log_dir=log_dir,
                                    redirects=Std.ALL if capture else Std.NONE),
    )


def _visible_gpus(plan: LaunchPlan) -> int:
    if plan.cpu:
        return 0
    import torch

    return int(torch.cuda.device_count())  # NVML-based (see main): no CUDA context here


def _fork(plan: LaunchPlan, command: Sequence[str]) -> bool:
    """Fork Python ranks from this process when no GPU is in use (CUDA is not fork-safe)."""
    if list(command[1:4]) != ["-u", "-m", "distlib.launcher._bootstrap"]:
        return False  # --no-python programs are always started fresh
    if plan.start_method != "auto":
        return plan.start_method == "fork"
    return _visible_gpus(plan) == 0


_CONSOLE_CLOSED = ("(its console was closed: the reader of the job's output went away, as "
                   "`distlib launch x.py | head` does; it ended quietly)")


def _no_traceback(exitcode: int, output: str = "") -> str:
    if exitcode < 0:
        return f"(stopped by signal {-exitcode}; no Python traceback)"
    where = output or "the rank's own output above"
    return (f"(exited with code {exitcode} without a Python traceback: sys.exit(), a program "
            f"run with --no-python, or a crash; see {where})")


def _where_output(output: OutputPlan, rank: int) -> str:
    """Where a rank's stderr can be read after the job: the console, its log, or nowhere."""
    log = (os.path.join(output.log_dir, f"rank_{rank}.log")
           if output.log_dir and output.keeps(2) else "")
    if output.shows(rank, 2):
        return f"the rank's own output above{f' and in {log}' if log else ''}"
    return f"its log file {log}" if log else (
        "nothing: its output was not shown (--ranks-filter) and no --log-dir kept it")


class _OnePrefix:
    """A console stream that writes a line once prefixed: ``[rank 1] [rank 1] x`` (a line
    `distlib.log.RankLogger` already prefixed) becomes ``[rank 1] x``. When the console's
    reader goes away (``| head``), it sets ``closed`` and drops what follows."""

    def __init__(self, dst: Any, heads: Mapping[int, str], closed: threading.Event) -> None:
        self.dst, self.heads = dst, tuple(h for h in set(heads.values()) if h)
        self.closed = closed

    def write(self, text: str) -> int:
        for head in self.heads:
            if text.startswith(head + head):
                text = text[len(head):]
                break
        if self.closed.is_set():
            return len(text)
        try:
            return int(self.dst.write(text))
        except BrokenPipeError:
            self._close()
            return len(text)

    def flush(self) -> None:
        if not self.closed.is_set():
            try:
                self.dst.flush()
            except BrokenPipeError:
                self._close()

    def _close(self) -> None:
        """Point the console's descriptor at /dev/null, so that what the stream still holds
        leaves quietly at exit, and tell the agent (`_observe` ends the ranks).

        Effects: replaces a file descriptor (1 or 2) of the agent process.
        """
        self.closed.set()
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.dst.fileno())
            os.close(devnull)


class _Tails:
    """Reads the captured output of each attempt's ranks back, line by line (a handle).

    The ranks write into torch's redirect files; torch's own `TailLog` copies them to the
    console (the shown ranks, ``[rank N] `` first when prefixing) and, with a log folder, to
    ``rank_N.log`` there (both streams, as they come). Started after torch starts the ranks,
    stopped after torch stops them, so every line written is copied before the agent ends.
    """

    def __init__(self, output: OutputPlan) -> None:
        self.output = output
        self.running: list[Any] = []
        self.files: list[tuple[Any, str]] = []  # (a rank's log, its error file)
        self.opened = False  # the log files: truncated by the first attempt, then appended
        self.console_closed = threading.Event()  # the console's reader went away

    def start(self, pcontext: Any) -> None:
        """Tail the redirect files of ``pcontext`` (torch's process context).

        Effects: starts threads; opens (truncates on the first attempt) the log files.
        """
        from torch.distributed.elastic.multiprocessing.tail_log import TailLog

        if not self.output.capture or pcontext is None:
            return
        out = self.output
        ranks = {local: int(env.get("RANK", local)) for local, env in pcontext.envs.items()}
        heads = {local: f"[rank {rank}] " if out.prefix else "" for local, rank in ranks.items()}
        console = [(pcontext.stdouts, 1, sys.stdout), (pcontext.stderrs, 2, sys.stderr)]
        for paths, stream, dst in console:
            shown = {local: path for local, path in paths.items()
                     if path and out.shows(ranks[local], stream)}
            once: Any = _OnePrefix(dst, heads, self.console_closed)
            self.running.append(TailLog("rank", shown, once, heads).start())
        if out.log_dir is None:
            return
        envs: dict[int, dict[str, str]] = dict(pcontext.envs)
        attempt = int(envs[min(envs)].get("TORCHELASTIC_RESTART_COUNT", "0")) if envs else 0
        first, self.opened = not self.opened, True
        for local, rank in ranks.items():
            kept = {stream: paths[local] for paths, stream, _ in console
                    if paths.get(local) and out.keeps(stream)}
            if not kept:
                continue
            handle = open(os.path.join(out.log_dir, f"rank_{rank}.log"),  # noqa: SIM115
                          "w" if first else "a", encoding="utf-8", errors="replace",
                          buffering=1)
            if not first:
                handle.write(f"--- distlib: attempt {attempt + 1} (after a restart) ---\n")
            self.files.append((handle, str(pcontext.error_files.get(local) or "")))
            self.running.append(TailLog("rank", kept, handle, dict.fromkeys(kept, "")).start())

    def stop(self) -> None:
        """Copy what is left of each file, then stop (the ranks have ended); a rank that
        raised gets its traceback at the end of its log (the bootstrap hands it to the agent
        instead of printing it, so the report shows it once).

        Effects: joins the threads; appends to and closes the log files.
        """
        for tail in self.running:
            tail.stop()
        for handle, error_file in self.files:
            info = _read(error_file).get("message", {}) if error_file else {}
            stack = info.get("extraInfo", {}).get("py_callstack") if isinstance(
                info, dict) else None
            if stack and self.output.keeps(2):
                handle.write(str(stack))
            handle.close()
        self.running, self.files = [], []


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return dict(json.load(handle))
    except (OSError, ValueError, TypeError):
        return {}


class _Watch:
    """What this agent learns about its ranks between torch's health checks (a handle).

    torch tells the agent of one failure per check (of one rank when they were forked), and
    stops the other ranks before anyone asks where they were. So before each of torch's
    checks this looks first: which ranks have exited and how (peeking, without reaping), a
    rank whose collective stalled or timed out (then every live rank's stack is taken before
    anything is stopped); after a failed check it prints the attempt's line.
    """

    def __init__(self, plan: LaunchPlan, log_dir: str, call: str,
                 output: OutputPlan | None = None) -> None:
        self.plan, self.log_dir, self.call = plan, log_dir, call
        self.output = output or OutputPlan()
        self.exits: dict[tuple[int, int], int] = {}  # (attempt, rank) -> exit code, in order
        self.stopped: set[tuple[int, int]] = set()  # ranks this agent stopped after a stall
        self.hang: dict[int, dict[str, Any]] = {}  # attempt -> the hang report
        self.attempts: list[str] = []
        self.last_failed = 0
        self.console_closed = False  # the agent's console lost its reader; it ended the ranks

    def folders(self, attempt: int) -> dict[int, str]:
        """Each rank's folder of ``attempt`` (torch's error-file folder), by local rank."""
        found = glob.glob(os.path.join(self.log_dir, "*", f"attempt_{attempt}", "*"))
        return {int(os.path.basename(f)): f for f in found if os.path.basename(f).isdigit()}

    def records(self, attempt: int, name: str) -> dict[int, dict[str, Any]]:
        """Each rank's record ``name`` (error.json, finished.json, ...) of ``attempt``."""
        out: dict[int, dict[str, Any]] = {}
        for folder in self.folders(attempt).values():
            data = _read(os.path.join(folder, name))
            if name == "error.json":
                data = dict(data.get("message", {}).get("extraInfo", {})) if data else {}
                if "distlib_rank" in data:
                    out[int(data["distlib_rank"])] = data
            elif "rank" in data:
                out[int(data["rank"])] = data
        return out

    def before(self, agent: Any, group: Any) -> None:
        """Peek at the ranks before torch's check; take stacks when a rank stalls or times out.

        Effects: may signal the ranks (stacks) and kill a stalled one.
        """
        attempt = group.spec.max_restarts - agent._remaining_restarts
        for worker in group.workers:
            key = (attempt, int(worker.global_rank))
            if key in self.exits or not worker.id:
                continue
            try:  # WNOWAIT: torch still reaps the rank and sees its exit code
                seen = os.waitid(os.P_PID, int(worker.id), os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                continue
            if seen is not None:
                self.exits[key] = (seen.si_status if seen.si_code == os.CLD_EXITED
                                   else -seen.si_status)
        if attempt not in self.hang:
            self._diagnose(attempt, group)

    def _diagnose(self, attempt: int, group: Any) -> None:
        failed = any(code != 0 for (a, _), code in self.exits.items() if a == attempt)
        if not failed and self.plan.stall_timeout_s is None:
            return  # nothing to look at: no rank ended badly, no stall watcher runs
        folders = self.folders(attempt)
        ranks = {int(w.global_rank): (int(w.id or 0), folders.get(int(w.local_rank), ""))
                 for w in group.workers}
        stalls = [_read(os.path.join(f, "stall.json")) for _, f in ranks.values() if f]
        stalls = [s for s in stalls if s]
        errors = self.records(attempt, "error.json") if failed or stalls else {}
        timeouts = [r for r, info in errors.items() if info.get("distlib_timeout")
                    and (attempt, r) in self.exits]
        if not stalls and not timeouts:
            return
        live = {r: v for r, v in ranks.items() if (attempt, r) not in self.exits and v[1]}
        stacks = collect_stacks(live)
        info: dict[int, dict[str, Any]] = {}
        texts: dict[int, str] = {}
        for rank, (_, folder) in ranks.items():
            seq = _read(os.path.join(folder, "progress.json")).get("seq") if folder else None
            if rank in stacks:
                frames = frames_of_stack(stacks[rank])
                where, collective = describe(frames)
                texts[rank] = format_stack(frames)
                info[rank] = {"where": where, "collective": collective, "seq": seq}
            elif rank in errors:
                error = errors[rank]
                info[rank] = {"where": error.get("distlib_where", ""), "seq": seq,
                              "collective": error.get("distlib_collective", ""),
                              "state": "timed out" if error.get("distlib_timeout") else "failed"}
        for stall in stalls:
            rank = int(stall["rank"])
            info.setdefault(rank, {}).update(
                collective=stall.get("collective", ""), seq=stall.get("seq"),
                state=f"no progress for {stall.get('seconds')} s")
            info[rank].setdefault("where", stall.get("where", ""))
        self.hang[attempt] = {
            "reason": "stall" if stalls else "timeout", "lines": hang_lines(info),
            "stacks": {str(r): t for r, t in sorted(texts.items())},
            "ranks": sorted(int(s["rank"]) for s in stalls) or sorted(timeouts),
            "seconds": max((float(s.get("seconds", 0)) for s in stalls), default=0.0)}
        for stall in stalls:  # end the attempt: torch then stops the rest of the group
            rank = int(stall["rank"])
            if rank in live:
                self.stopped.add((attempt, rank))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(live[rank][0], signal.SIGKILL)

    def close_console(self, group: Any) -> None:
        """End the ranks after the console (which the agent copies their output to) lost its
        reader: a rank that wrote to it directly would have ended at its next write.

        Effects: sends SIGTERM to every rank of ``group``, once.
        """
        if self.console_closed:
            return
        self.console_closed = True
        for worker in group.workers:
            if worker.id:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(worker.id), signal.SIGTERM)

    def after(self, agent: Any, group: Any, result: Any) -> None:
        """After a failed check: print the attempt's line when the job restarts.

        Effects: writes one line to stderr per failed attempt of a job with restarts.
        """
        from torch.distributed.elastic.agent.server.api import WorkerState

        if result.state != WorkerState.FAILED:
            return
        attempt = group.spec.max_restarts - agent._remaining_restarts
        self.last_failed = attempt
        for rank, failure in result.failures.items():
            self.exits.setdefault((attempt, int(rank)), int(failure.exitcode))
        if self.console_closed or self.records(attempt, "console_closed.json"):
            agent._remaining_restarts = 0  # nobody reads the output any more: end, as `| head` asks
        total = group.spec.max_restarts + 1
        if total == 1:
            return
        rows = self.rows(attempt)
        line = (f"attempt {attempt + 1} of {total} failed: {_summary(rows[0], self.hang.get(attempt))}"
                if rows else f"attempt {attempt + 1} of {total} failed")
        self.attempts.append(line)
        if agent._remaining_restarts > 0 and not self.plan.quiet:
            print(f"{self.call}: {line}; restarting ({agent._remaining_restarts} "
                  f"restart{'s' if agent._remaining_restarts > 1 else ''} left)",
                  file=sys.stderr, flush=True)

    def rows(self, attempt: int) -> list[dict[str, Any]]:
        """Each failed rank of ``attempt`` as plain data, the root cause first.

        The root cause is the earliest traceback that is not a complaint about a dead peer or
        a timeout; then a rank that died by itself (a signal, an exit code without traceback),
        then a timed-out rank, then ranks that only lost a peer; ranks the launcher stopped last.
        """
        recorded = self.records(attempt, "error.json")
        closed = self.records(attempt, "console_closed.json")
        exits = {rank: code for (a, rank), code in self.exits.items() if a == attempt}
        order = list(exits)
        rows = []
        for rank in sorted({r for r, c in exits.items() if c != 0} | set(recorded)):
            info = recorded.get(rank, {})
            traceback = info.get("py_callstack") or ""
            exitcode = exits.get(rank, 1)
            stopped = (attempt, rank) in self.stopped
            secondary, timed_out = bool(info.get("distlib_secondary")), bool(
                info.get("distlib_timeout"))
            died = rank in exits and not stopped
            if traceback and not secondary and not timed_out:
                key: tuple[int, int] = (0, int(info.get("distlib_time_ns", 0)))
            elif died and not traceback:
                key = (1, order.index(rank))
            elif traceback:
                key = (2 if timed_out else 3, int(info.get("distlib_time_ns", 0)))
            else:
                key = (4, rank)
            rows.append({"rank": rank, "exitcode": exitcode, "traceback": traceback,
                         "secondary": secondary, "timed_out": timed_out,
                         "signal": -exitcode if exitcode < 0 and died and not traceback else 0,
                         "where": info.get("distlib_where", ""),
                         "collective": info.get("distlib_collective", ""),
                         "console_closed": rank in closed or self.console_closed,
                         "message": "" if traceback else (
                             "(stopped by the launcher after the stall report)" if stopped
                             else _CONSOLE_CLOSED if rank in closed or self.console_closed
                             else _no_traceback(exitcode, _where_output(self.output, rank))),
                         "order": key})
        rows.sort(key=lambda row: (row["order"], row["rank"]))
        for row in rows:
            del row["order"]
        return rows

    def outcome(self) -> dict[str, Any]:
        """The failed job's outcome: its last attempt's rows, the attempt lines, the hang."""
        attempt = self.last_failed
        return {"ok": False, "failures": self.rows(attempt), "attempts": self.attempts,
                "finished": sorted(self.records(attempt, "finished.json")),
                "hang": self.hang.get(attempt), "machines": self.plan.max_machines}


def _summary(row: Mapping[str, Any], hang: Mapping[str, Any] | None) -> str:
    """One line for a failed attempt: the rank and what happened to it."""
    if hang and hang.get("reason") == "stall":
        return f"rank {hang['ranks'][0]} made no progress in a collective (stall timeout)"
    if row.get("signal"):
        return f"rank {row['rank']} was killed by signal {row['signal']} ({_signal_name(row['signal'])})"
    last = (row.get("traceback") or "").strip().splitlines()
    return f"rank {row['rank']} raised {last[-1]}" if last else (
        f"rank {row['rank']} exited with code {row['exitcode']}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _observe(watch: _Watch, tails: _Tails) -> None:
    """Let ``watch`` look at the ranks before and after each of torch's health checks, and
    ``tails`` read each attempt's output from when torch starts the ranks to when it stops them.

    torch's agent has no hook for this; its ``_monitor_workers`` is the one place every
    check passes through, ``_start_workers`` and ``_shutdown`` the places every attempt starts
    and ends. This process is the agent's own, so the wrappers touch no user code.

    Effects: replaces three methods of ``LocalElasticAgent`` in this process.
    """
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    original = LocalElasticAgent._monitor_workers
    start, shutdown = LocalElasticAgent._start_workers, LocalElasticAgent._shutdown

    def monitor(agent: Any, group: Any) -> Any:
        if tails.console_closed.is_set():
            watch.close_console(group)
        watch.before(agent, group)
        result = original(agent, group)
        watch.after(agent, group, result)
        return result

    def start_workers(agent: Any, group: Any) -> Any:
        pids = start(agent, group)
        tails.start(agent._pcontext)
        return pids

    def stop_all(agent: Any, *args: Any, **kwargs: Any) -> None:
        try:  # torch's own arguments, whatever its version takes (2.9: death_sig only)
            shutdown(agent, *args, **kwargs)
        finally:
            tails.stop()

    LocalElasticAgent._monitor_workers = monitor  # type: ignore[method-assign]
    LocalElasticAgent._start_workers = start_workers  # type: ignore[method-assign]
    LocalElasticAgent._shutdown = stop_all  # type: ignore[method-assign, assignment]


def _stdin_copy() -> int:
    """A duplicate of stdin for forked ranks (multiprocessing closes theirs), or -1."""
    try:
        return os.dup(0)
    except OSError:
        return -1


def _read_spec(source: str) -> dict[str, Any] | None:
    """The spec from a pipe (``fd:N``) or a file; None when the pipe closed without one."""
    try:
        if source.startswith("fd:"):
            with os.fdopen(int(source[3:]), "rb") as pipe:
                return dict(json.loads(pipe.read() or b"null") or {}) or None
        with open(source, encoding="utf-8") as handle:
            return dict(json.load(handle))
    except json.JSONDecodeError:
        return None


def _start_error(error: BaseException, plan: LaunchPlan) -> str:
    """The launcher's words for an error of torch's agent before any rank ran."""
    text = f"{type(error).__name__}: {error}"
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        return (f"main_port must be free on machine 0, but port {plan.main_port} on "
                f"{plan.main_address} is in use; pick another or use 0 (a free port).")
    return f"torch's agent failed before the ranks started: {text}"


def main(argv: Sequence[str]) -> int:
    """Run the agent for the spec at ``argv[0]`` (``fd:N``: a pipe); 0 when all ranks succeeded.

    torch is imported before the spec is read, so a launcher that starts this process first
    overlaps the import with its own planning.
    """
    die_with_parent()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    spec = _read_spec(argv[0])
    if spec is None:
        return 0  # the launcher stopped before launching (a config error, Ctrl-C)
    os.environ.clear()  # this process is the launcher's: the ranks inherit exactly this
    os.environ.update(spec["environ"])
    plan = LaunchPlan(**spec["plan"])
    if not plan.debug:
        for name in ("torch.distributed.elastic", "torch.distributed.launcher",
                     "torch.multiprocessing"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    # Count GPUs through NVML so this process never creates a CUDA context (it may fork);
    # the variable is gone again before the ranks start, so they inherit nothing of it.
    saved = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    command = spec["command"]
    refused = _mesh_refusal(plan) or _output_refusal(plan)
    if refused:
        _write_outcome(spec["outcome"], {"ok": False, "failures": [], "error": refused})
        return 1
    fork = _fork(plan, command)
    threads = rank_threads(plan, os.environ, nproc=_nproc(plan),
                           gpu_ranks=_visible_gpus(plan) > 0, num_cpus=_num_cpus())
    if threads is not None:  # the ranks inherit it; forked ones apply it (see fork_entry)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    output = plan_output(plan, _world(plan))
    config = _launch_config(plan, spec["log_dir"], "fork" if fork else "spawn", output.capture)
    if saved is None:
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
    else:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = saved
    entrypoint: Any = fork_entry if fork else command[0]
    watch = _Watch(plan, spec["log_dir"], spec.get("call", "distlib launch"), output)
    tails = _Tails(output)
    _observe(watch, tails)
    outcome: dict[str, Any] = {"ok": True, "failures": []}
    try:
        args = [str(_stdin_copy()), *command[4:]] if fork else command[1:]
        elastic_launch(config, entrypoint)(*args)
        outcome["attempts"] = watch.attempts
    except ChildFailedError:
        outcome = watch.outcome()
    except SignalException as error:
        outcome = {"ok": False, "failures": [], "signal": str(error.sigval.name)}
    except Exception as error:
        outcome = {"ok": False, "failures": [], "error": _start_error(error, plan)}
    finally:
        tails.stop()  # torch's _shutdown stopped them, unless it never got that far
    _write_outcome(spec["outcome"], outcome)
    return 0 if outcome["ok"] else 1


def _write_outcome(path: str, outcome: Mapping[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(outcome, handle)
    os.replace(tmp, path)


def _mesh_refusal(plan: LaunchPlan) -> str:
    """Why the plan's mesh cannot fit the ranks counted here ('' when it fits or is unset).

    The plan resolves its mesh when the process count is fixed; with the count left to the
    visible GPUs it is checked here, before any rank starts (an elastic range: in the ranks).
    """
    if plan.mesh is None or plan.mesh.is_resolved or plan.min_machines != plan.max_machines:
        return ""
    nproc = _nproc(plan)
    try:
        resolve_mesh(plan.mesh, nproc * plan.max_machines, nproc_per_node=nproc,
                     machines=plan.max_machines)
    except ConfigError as error:
        return str(error).removeprefix("launch(): ")
    return ""


def _world(plan: LaunchPlan) -> int | None:
    """The job's number of ranks once this machine's count is known (None: elastic)."""
    return None if plan.min_machines != plan.max_machines else _nproc(plan) * plan.max_machines


def _output_refusal(plan: LaunchPlan) -> str:
    """Why ``ranks_filter`` cannot work for the ranks counted here ('' when it can): the plan
    checks it itself when the process count is fixed, this when the visible GPUs set it."""
    try:
        plan_output(plan, _world(plan))
    except ConfigError as error:
        return str(error).removeprefix("launch(): ")
    return ""


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # The outcome file is written and closed, the ranks are gone: skip tearing down torch's
    # modules (a second or so on a busy machine) that nobody waits for.
    os._exit(code)
