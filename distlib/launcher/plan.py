"""`LaunchPlan`: what a launch starts, as one validated value (pure, torch-free).

Both `distlib.launch()` and ``distlib launch`` build a plan first; the agent process
(`distlib.launcher._agent`) turns it into torch's elastic ``LaunchConfig``. Counts follow the
documented convention: ``num_processes`` is the total across all machines, ``nproc_per_node``
the count on each machine, and a total that the machine count does not divide is an error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from distlib.env import DEFAULT_TIMEOUT_S  # the agent's rendezvous and Env.timeout_s
from distlib.errors import ConfigError, PrecisionError
from distlib.precision import parse_precision
from distlib.strategies.base import parse_strategy
from distlib.topology import AXES, Mesh, parse_mesh

__all__ = ["DEFAULT_TIMEOUT_S", "RDZV_BACKENDS", "START_METHODS", "STREAMS", "LaunchPlan",
           "OutputPlan", "mesh_text", "parse_machines", "parse_ranks", "plan_launch",
           "plan_output", "resolve_mesh"]


RDZV_BACKENDS = ("static", "c10d")
# How the agent starts Python ranks: "fork" reuses its imported torch (CPU-only machines),
# "spawn" starts fresh interpreters (always safe with CUDA); "auto" forks when no GPU is used.
START_METHODS = ("auto", "fork", "spawn")
# A rank's streams as torch's ``Std`` numbers them (``--tee``/``--redirects`` values): 1 stdout,
# 2 stderr, 3 both, 0 neither.
STREAMS = (0, 1, 2, 3)


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchPlan:
    """Everything the agent needs to start one machine's share of a job.

    ``None`` means "not chosen": ``nproc_per_node=None`` is resolved by the agent (visible GPUs,
    else 1); ``precision``/``strategy`` left ``None`` let ``detect()`` pick in each rank;
    ``stall_timeout_s`` ends the job with a report of where each rank is when a rank waits
    that long in one collective; ``collective_timeout_s=None`` means `DEFAULT_TIMEOUT_S`.
    ``num_threads=None`` gives each rank ``OMP_NUM_THREADS`` when it is set, else the
    machine's cores shared among its CPU ranks (one thread per GPU rank, as torchrun).
    ``mesh`` (a `Mesh`, ``"dp_shard=2,tp=2"`` or a mapping of axis sizes; None: each rank's
    default, all data parallel) is resolved against the world size when that is fixed, so a
    mesh that does not fit the processes is refused before anything starts.

    Example:
        >>> LaunchPlan(nproc_per_node=2, cpu=True).world_size
        2
        >>> LaunchPlan(nproc_per_node=4, mesh="tp=2").mesh
        Mesh(dp_replicate=1, dp_shard=2, cp=1, tp=2)
    """

    nproc_per_node: int | None = None
    min_machines: int = 1
    max_machines: int = 1
    machine_rank: int = 0
    main_address: str = "127.0.0.1"
    main_port: int = 0
    rdzv_backend: str = "static"
    run_id: str = "distlib"
    max_restarts: int = 0
    monitor_interval_s: float = 0.1
    cpu: bool = False
    gpu_ids: str | None = None
    precision: str | None = None
    strategy: str | None = None
    strategy_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    debug: bool = False
    collective_timeout_s: int | None = None
    stall_timeout_s: float | None = None
    start_method: str = "auto"
    num_threads: int | None = None
    mesh: Mesh | None = None
    log_dir: str | None = None
    ranks_filter: tuple[int, ...] | None = None
    rank_prefix: bool | None = None
    tee: int | None = None
    redirects: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        _check_int("nproc_per_node", self.nproc_per_node, 1, allow_none=True)
        _check_int("min_machines", self.min_machines, 1)
        _check_int("max_machines", self.max_machines, self.min_machines)
        _check_int("machine_rank", self.machine_rank, 0)
        _check_int("main_port", self.main_port, 0)
        _check_int("max_restarts", self.max_restarts, 0)
        _check_int("collective_timeout_s", self.collective_timeout_s, 1, allow_none=True)
        _check_int("num_threads", self.num_threads, 1, allow_none=True)
        if self.stall_timeout_s is not None and (
                isinstance(self.stall_timeout_s, bool)
                or not isinstance(self.stall_timeout_s, int | float)
                or not 0 < self.stall_timeout_s < float("inf")):
            msg = (f"LaunchPlan(): stall_timeout_s must be a number of seconds > 0 (None: no "
                   f"stall detection), but got {self.stall_timeout_s!r}. Pass --stall-timeout "
                   "S (stall_timeout_s=S) with a finite S > 0, or leave it unset.")
            raise ConfigError(msg)
        if self.main_port > 65535:
            _fail("main_port", self.main_port, "be in 0..65535 (0 picks a free port)")
        if self.machine_rank >= self.max_machines:
            _fail("machine_rank", self.machine_rank,
                  f"be below the number of machines ({self.max_machines})")
        if self.start_method not in START_METHODS:
            _fail("start_method", self.start_method, f"be one of {START_METHODS}")
        if self.rdzv_backend not in RDZV_BACKENDS:
            _fail("rdzv_backend", self.rdzv_backend, f"be one of {RDZV_BACKENDS}")
        if self.min_machines != self.max_machines and self.rdzv_backend != "c10d":
            _fail("rdzv_backend", self.rdzv_backend,
                  "be 'c10d' for an elastic MIN:MAX machine range")
        if self.max_machines > 1 and self.main_port == 0:
            _fail("main_port", 0, "be a fixed port when the job spans machines (all machines "
                  "must agree on it)")
        if not self.monitor_interval_s > 0:
            _fail("monitor_interval_s", self.monitor_interval_s, "be > 0 seconds")
        if not self.main_address or not isinstance(self.main_address, str):
            _fail("main_address", self.main_address, "be a host name or IP address")
        if self.precision is not None:
            try:
                value = parse_precision(self.precision, source="LaunchPlan(): precision")
            except PrecisionError as error:
                raise ConfigError(str(error)) from None
            object.__setattr__(self, "precision", value.value)
        if self.strategy is None and self.strategy_options:
            _fail("strategy_options", dict(self.strategy_options), "be empty without a strategy")
        if self.strategy is not None:
            parse_strategy(self.strategy, self.strategy_options, source="LaunchPlan(): strategy")
        object.__setattr__(self, "strategy_options", dict(self.strategy_options))
        if self.mesh is not None:
            object.__setattr__(self, "mesh", _plan_mesh(self))
        _check_output(self)

    @property
    def world_size(self) -> int | None:
        """The total number of ranks when it is fixed, else None."""
        if self.nproc_per_node is None or self.min_machines != self.max_machines:
            return None
        return self.nproc_per_node * self.max_machines


def _plan_mesh(plan: LaunchPlan) -> Mesh:
    """The plan's mesh as a `Mesh`, resolved when the world size is fixed."""
    value: object = plan.mesh
    if isinstance(value, str):
        value = parse_mesh(value, source="LaunchPlan(): mesh")
    elif isinstance(value, Mapping):  # a plan read back from JSON, or mesh={"tp": 2}
        unknown = sorted(set(map(str, value)) - {*AXES, "inferred"})
        if unknown:
            _fail("mesh", dict(value), f"map axes among {AXES} to sizes")
        value = Mesh(**{str(k): v for k, v in value.items()})
    if not isinstance(value, Mesh):
        msg = (f"LaunchPlan(): mesh must be a Mesh, a string like 'dp_shard=2,tp=2' or a "
               f"mapping of axis sizes, but got {value!r}.")
        raise ConfigError(msg)
    if plan.strategy == "xla" and not value.is_data_parallel_only:
        _fail("mesh", str(value), "be data parallel only (cp = tp = 1) with strategy 'xla'; "
              "torch_xla shards with its own SPMD mesh")
    world = plan.world_size
    if world is None:
        return value
    return resolve_mesh(value, world, nproc_per_node=plan.nproc_per_node,
                        machines=plan.max_machines)


def parse_ranks(value: object, *, source: str = "launch(): ranks_filter"
                ) -> tuple[int, ...] | None:
    """Read a list of ranks: ``"0,2"``, ``0``, ``[0, 2]``; ``None`` or ``"all"``: every rank.

    Raises:
        ConfigError: not whole numbers >= 0, or none at all.

    Examples:
        >>> parse_ranks("2, 0,2"), parse_ranks(1), parse_ranks("all")
        ((0, 2), (1,), None)
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    if isinstance(value, str):
        parts: list[object] = [p.strip() for p in value.split(",")]
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, (list, tuple, set, frozenset)):
        parts = list(value)
    else:
        parts = [value]
    ranks = []
    for part in parts or [None]:  # no rank at all: refused like a malformed one
        if isinstance(part, str) and part.isdigit() and part.isascii():
            part = int(part)
        if isinstance(part, bool) or not isinstance(part, int) or part < 0:
            msg = (f"{source} must be ranks separated by commas, each a whole number >= 0 "
                   f"(or 'all'), but got {value!r}. Write e.g. --ranks-filter 0 or "
                   "--ranks-filter 0,2 (ranks_filter=[0, 2]).")
            raise ConfigError(msg)
        ranks.append(part)
    return tuple(sorted(set(ranks)))


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputPlan:
    """Where each rank's stdout and stderr go (a value; `plan_output` builds it).

    ``capture``: the ranks write into files that the agent reads back line by line (torch's
    redirects); False: they write to the launcher's terminal directly (the default, so a
    rank's output stays a terminal: colours, progress bars, ``breakpoint()``). ``prefix``:
    each console line starts with ``[rank N] ``. ``console``: the ranks the console shows
    (None: all), ``console_streams`` which of their streams, ``file_streams`` which streams
    go to ``log_dir``/rank_N.log.

    Example:
        >>> out = plan_output(LaunchPlan(nproc_per_node=2, ranks_filter="0"), 2)
        >>> out.capture, out.prefix, out.shows(0, 1), out.shows(1, 1)
        (True, True, True, False)
    """

    capture: bool = False
    prefix: bool = False
    console: tuple[int, ...] | None = None
    console_streams: int = 3
    file_streams: int = 0
    log_dir: str | None = None

    def shows(self, rank: int, stream: int) -> bool:
        """Whether the console shows ``stream`` (1 stdout, 2 stderr) of ``rank``."""
        return bool(self.console_streams & stream) and (
            self.console is None or rank in self.console)

    def keeps(self, stream: int) -> bool:
        """Whether ``stream`` (1 stdout, 2 stderr) goes to the rank's log file."""
        return self.log_dir is not None and bool(self.file_streams & stream)


def plan_output(plan: LaunchPlan, world_size: int | None) -> OutputPlan:
    """Where the ranks' output goes, for ``world_size`` ranks (None: not known yet).

    The rank prefix, left unset, is on when the output is captured anyway (``log_dir``,
    ``ranks_filter`` or ``redirects``) and more than one rank runs, as torchrun prefixes
    every line it tees; otherwise the ranks keep the terminal.

    Raises:
        ConfigError: ``ranks_filter`` names a rank >= ``world_size``.

    Examples:
        >>> plan_output(LaunchPlan(nproc_per_node=2), 2).capture
        False
        >>> out = plan_output(LaunchPlan(nproc_per_node=2, log_dir="logs", redirects=1), 2)
        >>> out.prefix, out.shows(0, 1), out.shows(0, 2), out.keeps(1), out.keeps(2)
        (True, False, True, True, True)
    """
    ranks = plan.ranks_filter
    if ranks and world_size is not None and max(ranks) >= world_size:
        text = ",".join(map(str, ranks))
        msg = (f"launch(): ranks_filter must name ranks in 0..{world_size - 1} (the job has "
               f"{world_size} process{'es' if world_size > 1 else ''}), but got {text!r}. "
               f"Pass --ranks-filter with ranks below {world_size} (e.g. --ranks-filter 0), "
               "or more --num-processes.")
        raise ConfigError(msg)
    if world_size is not None and ranks is not None and len(ranks) == world_size:
        ranks = None  # every rank: no filter
    captured = plan.log_dir is not None or ranks is not None or plan.redirects != 0
    several = world_size is None or world_size > 1
    prefix = plan.rank_prefix if plan.rank_prefix is not None else captured and several
    return OutputPlan(capture=captured or prefix, prefix=prefix, console=ranks,
                      console_streams=3 & ~plan.redirects,
                      file_streams=(3 if plan.tee is None else plan.tee) | plan.redirects,
                      log_dir=plan.log_dir)


def _check_output(plan: LaunchPlan) -> None:
    """Validate the output fields of ``plan`` (normalising ``ranks_filter`` to a tuple)."""
    if plan.log_dir is not None and (not isinstance(plan.log_dir, str) or not plan.log_dir
                                     or "\x00" in plan.log_dir):
        msg = (f"launch(): log_dir must be a folder path, but got {plan.log_dir!r}. Pass "
               "--log-dir DIR (log_dir='DIR'), or leave it out to keep no log files.")
        raise ConfigError(msg)
    object.__setattr__(plan, "ranks_filter", parse_ranks(plan.ranks_filter))
    if plan.rank_prefix is not None and not isinstance(plan.rank_prefix, bool):
        _fail("rank_prefix", plan.rank_prefix, "be True, False or None (on when the output "
              "is captured and several ranks run)")
    if not isinstance(plan.quiet, bool):
        _fail("quiet", plan.quiet, "be True or False")
    for name in ("tee", "redirects"):
        value = getattr(plan, name)
        if value is None and name == "tee":
            continue
        if isinstance(value, bool) or value not in STREAMS:
            msg = (f"launch(): {name} must be one of 0, 1, 2, 3 (torch's streams: 1 stdout, "
                   f"2 stderr, 3 both), but got {value!r}. torchrun's per-rank form "
                   f"('0:1,1:2') is not supported; pass --{name} 3 for both streams.")
            raise ConfigError(msg)
        if value and plan.log_dir is None:
            msg = (f"launch(): {name} must be 0 without a log_dir (the streams it names go "
                   f"to the log files), but got {name}={value}. Pass --log-dir DIR "
                   f"(log_dir='DIR') too.")
            raise ConfigError(msg)
    if plan.world_size is not None:
        plan_output(plan, plan.world_size)  # a filter naming a rank that will not exist


def resolve_mesh(mesh: Mesh, world_size: int, *, nproc_per_node: int | None = None,
                 machines: int = 1) -> Mesh:
    """``mesh`` resolved for ``world_size`` ranks, with the launcher's words when it does not fit.

    Raises:
        ConfigError: the sizes do not multiply to (or, with one inferred, divide) the world
            size; the message names the flags.

    Example:
        >>> resolve_mesh(Mesh(tp=2), 8)
        Mesh(dp_replicate=1, dp_shard=4, cp=1, tp=2)
    """
    try:
        return mesh.resolve(world_size)
    except ConfigError:
        counts = (f" ({nproc_per_node} per machine x {machines} machines)"
                  if nproc_per_node is not None and machines > 1 else "")
        free = [axis for axis, size in mesh.sizes.items() if size == -1]
        inferred = f" (the sizes given must divide it; {free[0]} takes the rest)" if free else ""
        product = math.prod(size for size in mesh.sizes.values() if size != -1)
        msg = (f"launch(): the mesh's axis sizes must multiply to the number of processes"
               f"{inferred}, but got {mesh_text(mesh)} (product {product}) for {world_size} "
               f"processes{counts}. "
               "Change --dp-replicate-size/--dp-shard-size/--cp-size/--tp-size (leave "
               "--dp-shard-size out to infer it) or --num-processes.")
        raise ConfigError(msg) from None


def mesh_text(mesh: Mesh) -> str:
    """The mesh as ``DISTLIB_MESH`` holds it (every axis; ``-1``: inferred in the ranks).

    Example:
        >>> mesh_text(Mesh(tp=2))
        'dp_replicate=1,dp_shard=-1,cp=1,tp=2'
    """
    return ",".join(f"{axis}={size}" for axis, size in mesh.sizes.items())


def _fail(name: str, value: object, rule: str) -> None:
    msg = f"LaunchPlan(): {name} must {rule}, but got {value!r}."
    raise ConfigError(msg)


def _check_int(name: str, value: object, low: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, "be an int")
    elif value < low:
        _fail(name, value, f"be >= {low}")


def parse_machines(value: int | str, *, source: str = "num_machines") -> tuple[int, int]:
    """Read a machine count: ``2`` or ``"2"`` is fixed, ``"1:4"`` is an elastic range.

    Example:
        >>> parse_machines("1:4"), parse_machines(2)
        ((1, 4), (2, 2))
    """
    text = str(value).strip()
    low, sep, high = text.partition(":")
    if not (low.isdigit() and (high.isdigit() if sep else True)):
        msg = (f"{source} must be a count like 2 or a range MIN:MAX like 1:4, but got "
               f"{value!r}.")
        raise ConfigError(msg)
    lo, hi = int(low), int(high) if sep else int(low)
    if lo < 1 or hi < lo:
        msg = f"{source} must satisfy 1 <= MIN <= MAX, but got {value!r}."
        raise ConfigError(msg)
    return lo, hi


def plan_launch(
    *,
    num_processes: int | None = None,
    nproc_per_node: int | None = None,
    num_machines: int | str = 1,
    **options: Any,
) -> LaunchPlan:
    """Build a `LaunchPlan` from the user's vocabulary (total or per-machine counts).

    Args:
        num_processes: the total number of ranks across all machines.
        nproc_per_node: the number of ranks on each machine (an alternative to the total).
        num_machines: a count, or ``"MIN:MAX"`` for an elastic job (needs ``nproc_per_node``).
        **options: the other `LaunchPlan` fields.

    Raises:
        ConfigError: the counts contradict each other or do not divide.

    Example:
        >>> plan_launch(num_processes=4, num_machines=2, main_port=29400).nproc_per_node
        2
    """
    lo, hi = parse_machines(num_machines)
    per_node = nproc_per_node
    if num_processes is not None:
        _check_int("num_processes", num_processes, 1)
        if lo != hi and nproc_per_node is None:
            msg = (f"launch(): nproc_per_node must be given for an elastic machine range, but "
                   f"got num_machines={num_machines!r} with only num_processes="
                   f"{num_processes}. Pass --nproc-per-node.")
            raise ConfigError(msg)
        if num_processes % hi:
            msg = (f"launch(): num_processes must be a multiple of the number of machines "
                   f"(it is the total across machines), but got num_processes={num_processes}"
                   f", num_machines={hi}. Use a multiple of {hi}, or --nproc-per-node.")
            raise ConfigError(msg)
        per_node = num_processes // hi
        if nproc_per_node is not None and nproc_per_node != per_node and lo == hi:
            msg = (f"launch(): nproc_per_node must equal num_processes / num_machines, but got "
                   f"nproc_per_node={nproc_per_node}, num_processes={num_processes}, "
                   f"num_machines={hi}. Give only one of the two counts.")
            raise ConfigError(msg)
        if nproc_per_node is not None:
            per_node = nproc_per_node
    return LaunchPlan(nproc_per_node=per_node, min_machines=lo, max_machines=hi, **options)


def plan_fields() -> tuple[str, ...]:
    """The names of `LaunchPlan`'s fields (for serialising plans)."""
    return tuple(f.name for f in dataclasses.fields(LaunchPlan))

