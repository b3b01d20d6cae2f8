"""`child_environ`: the exact environment a launched rank starts with (pure).

The launcher never edits the caller's ``os.environ``; it builds this mapping and hands it to
the agent process, whose children (the ranks) inherit it plus torch's rank variables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

from distlib.env import parse_bool
from distlib.errors import ConfigError
from distlib.launcher.plan import LaunchPlan, mesh_text

__all__ = ["DISTLIB_VARIABLES", "child_environ", "rank_threads"]

# Every variable the launcher owns; inherited values of these are replaced or dropped.
DISTLIB_VARIABLES = ("DISTLIB_LAUNCHED", "DISTLIB_STRATEGY", "DISTLIB_STRATEGY_OPTIONS",
                     "DISTLIB_PRECISION", "DISTLIB_CPU", "DISTLIB_DEBUG", "DISTLIB_TIMEOUT",
                     "DISTLIB_XLA_REPLICAS", "DISTLIB_STALL_TIMEOUT", "DISTLIB_MESH")


def _python_path(base: Mapping[str, str], sys_path: Iterable[str], cwd: str,
                 skip_prefixes: Iterable[str]) -> str | None:
    """The caller's own import paths first, so ranks can import what the caller imported."""
    skip = tuple(p for p in skip_prefixes if p)
    entries: list[str] = []
    for entry in sys_path:
        path = os.path.join(cwd, entry) if not os.path.isabs(entry) else entry
        if skip and path.startswith(skip):
            continue
        if path not in entries:
            entries.append(path)
    inherited = [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
    entries += [p for p in inherited if p not in entries]
    return os.pathsep.join(entries) if entries else None


def child_environ(
    base: Mapping[str, str],
    plan: LaunchPlan,
    *,
    sys_path: Iterable[str] = (),
    cwd: str = "/",
    skip_prefixes: Iterable[str] = (),
) -> dict[str, str]:
    """Return the environment for the agent process and the ranks it starts.

    Args:
        base: the environment to start from (the caller's ``os.environ``); not modified.
        plan: the launch plan whose settings become ``DISTLIB_*`` variables.
        sys_path: the caller's ``sys.path``; entries outside ``skip_prefixes`` are put first on
            ``PYTHONPATH`` (relative entries resolved against ``cwd``), so a function defined
            in a test file or a local module can be imported by every rank.
        cwd: the directory relative ``sys_path`` entries are relative to.
        skip_prefixes: path prefixes (the interpreter's own) that need no ``PYTHONPATH``.

    Returns:
        A new dict: ``base`` plus ``DISTLIB_LAUNCHED=1`` and the plan's ``DISTLIB_*``
        variables; inherited ``DISTLIB_*`` variables the plan leaves unset are dropped. The
        threads of each rank are set by the agent (`rank_threads`), which knows the rank count.

    Raises:
        ConfigError: ``OMP_NUM_THREADS`` is set but not a whole number >= 1.

    Example:
        >>> plan = LaunchPlan(nproc_per_node=2, cpu=True, precision="bf16")
        >>> env = child_environ({"HOME": "/root", "DISTLIB_STRATEGY": "fsdp"}, plan)
        >>> env["DISTLIB_LAUNCHED"], env["DISTLIB_CPU"], env["DISTLIB_PRECISION"]
        ('1', '1', 'bf16')
        >>> "DISTLIB_STRATEGY" in env
        False
    """
    inherited_threads(base)  # a malformed OMP_NUM_THREADS is refused before anything starts
    env = {k: v for k, v in base.items() if k not in DISTLIB_VARIABLES}
    env["DISTLIB_LAUNCHED"] = "1"
    if plan.cpu:
        env["DISTLIB_CPU"] = "1"
    if plan.debug:
        env["DISTLIB_DEBUG"] = "1"
    if plan.precision is not None:
        env["DISTLIB_PRECISION"] = str(plan.precision)
    if plan.strategy is not None:
        env["DISTLIB_STRATEGY"] = plan.strategy
        env["DISTLIB_STRATEGY_OPTIONS"] = json.dumps(dict(plan.strategy_options),
                                                     sort_keys=True)
    if plan.collective_timeout_s is not None:
        env["DISTLIB_TIMEOUT"] = str(plan.collective_timeout_s)
    if plan.mesh is not None:  # every axis; -1 (not yet known) is inferred by detect()
        env["DISTLIB_MESH"] = mesh_text(plan.mesh)
    if plan.stall_timeout_s is not None:  # read by the bootstrap's stall watcher
        env["DISTLIB_STALL_TIMEOUT"] = str(plan.stall_timeout_s)
    if plan.gpu_ids is not None and plan.gpu_ids != "all":
        env["CUDA_VISIBLE_DEVICES"] = plan.gpu_ids
    if plan.strategy == "xla":
        env.update(_xla_variables(env, plan))
    python_path = _python_path(base, sys_path, cwd, skip_prefixes)
    if python_path:
        env["PYTHONPATH"] = python_path
    return env


def inherited_threads(environ: Mapping[str, str]) -> int | None:
    """The ``OMP_NUM_THREADS`` the launcher inherited, or None when it is unset (pure).

    Raises:
        ConfigError: it is set but not a whole number >= 1.

    Examples:
        >>> inherited_threads({"OMP_NUM_THREADS": "4"}), inherited_threads({})
        (4, None)
    """
    value = environ.get("OMP_NUM_THREADS")
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) < 1:
        msg = (f"launch(): OMP_NUM_THREADS must be a whole number >= 1, but got "
               f"OMP_NUM_THREADS={value!r}. Unset it, or pass --num-threads N (num_threads=N) "
               "to set the threads of each rank.")
        raise ConfigError(msg)
    return int(value)


def rank_threads(plan: LaunchPlan, environ: Mapping[str, str], *, nproc: int, gpu_ranks: bool,
                 num_cpus: int) -> int | None:
    """How many threads each rank's torch uses, or None to leave torch's default (pure).

    ``plan.num_threads`` wins; else an ``OMP_NUM_THREADS`` the launcher inherited; else, with
    several ranks on the machine, one thread per GPU rank (as torchrun) and the machine's
    cores shared among CPU ranks (as Accelerate on CPUs), so ranks never oversubscribe the
    cores. One rank (or XLA's one process per machine) keeps torch's default.

    Args:
        plan: the launch plan (``num_threads``, ``strategy``).
        environ: the environment the ranks start from.
        nproc: ranks on this machine.
        gpu_ranks: whether the ranks use GPUs.
        num_cpus: the cores this machine gives the job.

    Raises:
        ConfigError: ``OMP_NUM_THREADS`` is set but not a whole number >= 1.

    Examples:
        >>> rank_threads(LaunchPlan(), {}, nproc=2, gpu_ranks=False, num_cpus=16)
        8
        >>> rank_threads(LaunchPlan(), {}, nproc=4, gpu_ranks=True, num_cpus=16)
        1
        >>> rank_threads(LaunchPlan(num_threads=3), {"OMP_NUM_THREADS": "1"}, nproc=2,
        ...              gpu_ranks=False, num_cpus=2)
        3
    """
    if plan.num_threads is not None:
        return plan.num_threads
    inherited = inherited_threads(environ)
    if inherited is not None:
        return inherited
    if plan.strategy == "xla" or nproc <= 1:
        return None
    return 1 if gpu_ranks else max(1, num_cpus // nproc)


def _xla_variables(env: Mapping[str, str], plan: LaunchPlan) -> dict[str, str]:
    """torch_xla's variables for ``--strategy xla`` (one process per machine; see docs/tpu.md).

    SPMD (``spmd`` strategy option, or ``XLA_USE_SPMD=1`` already set): that process drives
    every device; on the CPU client ``CPU_NUM_DEVICES`` is the per-machine count. Otherwise
    the process starts the replicas with ``xmp.spawn`` (``DISTLIB_XLA_REPLICAS``: ``1``, or
    ``all`` devices); on the CPU client only one, since collectives between replicas never
    complete there (pytorch/xla#9089).
    """
    import importlib.util

    device = env.get("PJRT_DEVICE") or (
        "TPU" if importlib.util.find_spec("libtpu") is not None else "CPU")
    spmd = bool(plan.strategy_options.get("spmd")) or parse_bool(env.get("XLA_USE_SPMD")) is True
    count = plan.nproc_per_node
    out = {"PJRT_DEVICE": device}
    if spmd:
        options = dict(plan.strategy_options) | {"spmd": True}
        out |= {"XLA_USE_SPMD": "1",
                "DISTLIB_STRATEGY_OPTIONS": json.dumps(options, sort_keys=True)}
        if device == "CPU" and count is not None:
            out["CPU_NUM_DEVICES"] = str(count)
        return out
    if device == "CPU" and count is not None and count > 1:
        msg = (f"launch(): with strategy 'xla' on PJRT_DEVICE=CPU the number of processes "
               f"must be 1, but got {count}. Collectives between XLA replicas never complete "
               "on the CPU client (pytorch/xla#9089); for several CPU devices use SPMD: "
               "XLA_USE_SPMD=1 (or strategy_options={'spmd': True}).")
        raise ConfigError(msg)
    out["DISTLIB_XLA_REPLICAS"] = "1" if count == 1 else "all"
    return out
