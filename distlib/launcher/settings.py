"""The launcher's settings: one table that says, for each, every name it goes by (pure).

Each `Setting` names its command-line flag (``--num-processes``; ``--num_processes`` is
accepted too), its config-file key (the setting's name), the ``DISTLIB_*`` variable the
launcher falls back to (and that each rank reads), the question ``distlib config`` asks, and
the `LaunchPlan` field or strategy option it becomes. ``distlib launch``'s flags, the config
file reader and ``distlib config``'s questions are all generated from `TABLE`; nothing else
lists the settings.

The four mesh settings (``dp_replicate_size``, ``dp_shard_size``, ``cp_size``, ``tp_size``)
fill one `LaunchPlan` field, ``mesh`` (a `distlib.topology.Mesh`), and share one variable,
``DISTLIB_MESH="dp_replicate=2,dp_shard=2,cp=1,tp=2"``, which every rank's ``detect()`` reads.

One name per setting: the rendezvous-and-collective timeout is ``timeout`` everywhere a user
types it (``--timeout``, ``timeout:``, ``DISTLIB_TIMEOUT``, ``Env.timeout_s``); only its
`LaunchPlan` field is ``collective_timeout_s``, because ``launch(timeout_s=...)`` already
means the limit of the whole job. An alias flag exists only where Accelerate's or torchrun's
users type it (``--num_cpu_threads_per_process``, ``--master-addr``, ``--nnodes``...); each is
listed, with the distlib flag it means, in docs/migration.md (a test checks the table).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distlib.env import DEFAULT_TIMEOUT_S
from distlib.errors import ConfigError
from distlib.launcher.plan import RDZV_BACKENDS, START_METHODS

__all__ = ["ASK_WHEN", "MESH_VARIABLE", "SETTINGS", "TABLE", "THREADS_DEFAULT", "Setting",
           "flag_name"]

# When ``distlib config`` asks a question, given the answers so far.
ASK_WHEN = ("always", "several machines", "gpus", "fsdp", "deepspeed")

# The one variable that carries the mesh to the ranks (all four mesh settings).
MESH_VARIABLE = "DISTLIB_MESH"

THREADS_DEFAULT = ("$OMP_NUM_THREADS, else the machine's cores shared among its CPU ranks; "
                   "1 per GPU rank")


def flag_name(name: str) -> str:
    """The command-line spelling of a setting (``num_processes`` -> ``--num-processes``).

    Example:
        >>> flag_name("num_processes")
        '--num-processes'
    """
    return "--" + name.replace("_", "-")


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """One launcher setting and every name it goes by.

    Attributes:
        name: the config-file key and the flag (``--`` + name with dashes).
        kind: ``int``, ``float``, ``str`` or ``bool``.
        default: the value when no source sets it (None: not chosen, derived later).
        help: the flag's help text.
        choices: the valid values, if closed.
        group: ``launch``, ``mesh`` (the axis sizes), or ``fsdp`` / ``deepspeed`` (options
            of that strategy).
        minimum: the smallest valid number.
        aliases: other accepted flags, as Accelerate's or torchrun's users type them
            (``--master-addr``, ``--main_process_ip``); both their dash and underscore
            spellings are accepted, and ``--help`` names them after the help text.
        metavar: the placeholder in ``--help`` (empty: ``N`` for a whole number,
            ``SECONDS`` for a number, the choices when closed).
        environ: the ``DISTLIB_*`` variable the launcher reads when no flag or config sets
            the setting (and that the ranks receive).
        question: what ``distlib config`` asks, or None when it does not ask.
        ask_when: one of `ASK_WHEN`.
        ask_order: the question's place among the questions (answers are read in order).
        offer: the answer offered in brackets when it differs from ``default``.
        plan_field: the `LaunchPlan` field it fills (None: a count, or a strategy option).
        strategy_option: ``(strategy, option)`` it becomes, for a strategy's own options.
        mesh_axis: the axis of the plan's ``mesh`` whose size it is (``plan_field`` is
            ``"mesh"``); its variable (`MESH_VARIABLE`) holds all four axes.

    Example:
        >>> SETTINGS["timeout"].flag, SETTINGS["timeout"].environ
        ('--timeout', 'DISTLIB_TIMEOUT')
    """

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    group: str = "launch"
    minimum: int | None = None
    aliases: tuple[str, ...] = ()
    environ: str | None = None
    question: str | None = None
    ask_when: str = "always"
    ask_order: int = 0
    offer: Any = None
    plan_field: str | None = None
    strategy_option: tuple[str, str] | None = None
    mesh_axis: str | None = None
    metavar: str = ""

    def __post_init__(self) -> None:
        if self.ask_when not in ASK_WHEN:
            msg = (f"Setting(): ask_when must be one of {ASK_WHEN}, but got "
                   f"{self.ask_when!r} for {self.name!r}.")
            raise ConfigError(msg)

    @property
    def flag(self) -> str:
        """The command-line flag."""
        return flag_name(self.name)


def _fsdp(name: str, kind: type, text: str, **more: Any) -> Setting:
    return Setting(name=f"fsdp_{name}", kind=kind, default=None, help=text, group="fsdp",
                   strategy_option=("fsdp", name), **more)


def _mesh(axis: str, text: str, **more: Any) -> Setting:
    return Setting(name=f"{axis}_size", kind=int, default=None, minimum=1, group="mesh",
                   help=text, environ=MESH_VARIABLE, plan_field="mesh", mesh_axis=axis,
                   **more)


def _ds(name: str, option: str, kind: type, text: str, **more: Any) -> Setting:
    return Setting(name=name, kind=kind, default=None, help=text, group="deepspeed",
                   strategy_option=("deepspeed", option), **more)


_OFF_ON = ("none", "cpu", "nvme")

TABLE: tuple[Setting, ...] = (
    Setting(name="num_processes", kind=int, default=None,
            help="total number of ranks across all machines (default: visible GPUs per "
                 "machine, else 1)",
            question="How many processes in total, across all machines?", ask_order=7),
    Setting(name="nproc_per_node", kind=int, default=None, plan_field="nproc_per_node",
            help="ranks on each machine (alternative to --num-processes; default: "
                 "--num-processes / machines)"),
    Setting(name="num_machines", kind=str, default="1", aliases=("--nnodes",), metavar="N",
            help="number of machines, or MIN:MAX for an elastic job",
            question="How many machines take part?", ask_order=2),
    Setting(name="machine_rank", kind=int, default=0, plan_field="machine_rank",
            help="rank of this machine (0 hosts the rendezvous)", aliases=("--node-rank",),
            question="Rank of this machine (0 hosts the rendezvous)?",
            ask_when="several machines", ask_order=3),
    Setting(name="main_address", kind=str, default="127.0.0.1", plan_field="main_address",
            help="address of machine 0", aliases=("--main_process_ip", "--master-addr"),
            metavar="ADDR", question="Address of machine 0?",
            ask_when="several machines", ask_order=4),
    Setting(name="main_port", kind=int, default=None, plan_field="main_port",
            help="rendezvous port on machine 0 (0: pick a free one; default 0 on one "
                 "machine, 29500 on several)",
            question="Port on machine 0?", ask_when="several machines", ask_order=5,
            offer=29500, aliases=("--main_process_port", "--master-port"), metavar="PORT"),
    Setting(name="rdzv_backend", kind=str, default="static", choices=RDZV_BACKENDS,
            plan_field="rdzv_backend", help="rendezvous backend",
            question="Rendezvous backend?", ask_when="several machines", ask_order=6),
    Setting(name="rdzv_id", kind=str, default="distlib", plan_field="run_id", metavar="ID",
            help="the job id every machine of one job gives the rendezvous (torchrun's "
                 "--rdzv-id; it keeps two c10d jobs on one address apart)"),
    Setting(name="max_restarts", kind=int, default=0, plan_field="max_restarts",
            help="restart the whole group this many times after a failure"),
    Setting(name="monitor_interval", kind=float, default=0.1, plan_field="monitor_interval_s",
            help="seconds between checks of the ranks' health"),
    Setting(name="cpu", kind=bool, default=False, plan_field="cpu", environ="DISTLIB_CPU",
            help="run on CPUs even when GPUs are present",
            question="Run on CPUs only, even if GPUs are present?", ask_order=1),
    Setting(name="gpu_ids", kind=str, default="all", plan_field="gpu_ids",
            help="GPUs to use on this machine, e.g. 0,1 (default: all)", metavar="LIST",
            question="Which GPUs on this machine (e.g. 0,1)?", ask_when="gpus", ask_order=8),
    Setting(name="precision", kind=str, default="no", choices=("no", "fp16", "bf16", "fp8"),
            plan_field="precision", environ="DISTLIB_PRECISION", help="mixed precision",
            aliases=("--mixed_precision",),
            question="Mixed precision?", ask_order=21),
    Setting(name="strategy", kind=str, default=None,
            choices=("single", "ddp", "fsdp", "deepspeed", "xla"), plan_field="strategy",
            environ="DISTLIB_STRATEGY",
            help="how the model is distributed (default: fsdp for a tp/cp mesh, ddp for several ranks, else single)",
            question="Distribution strategy?", ask_order=9, offer="auto"),
    Setting(name="timeout", kind=int, default=None, minimum=1, metavar="SECONDS",
            plan_field="collective_timeout_s", environ="DISTLIB_TIMEOUT",
            help="seconds the rendezvous and each collective may wait (default "
                 f"{DEFAULT_TIMEOUT_S})"),
    Setting(name="stall_timeout", kind=float, default=None, plan_field="stall_timeout_s",
            help="seconds a rank may wait in one collective before the job is stopped with "
                 "a report of where every rank is (default: off, only --timeout)"),
    Setting(name="start_method", kind=str, default="auto", choices=START_METHODS,
            plan_field="start_method",
            help="how Python ranks start: fork from the agent (fast, CPU only), spawn fresh "
                 "interpreters, or auto (fork when no GPU is used)"),
    Setting(name="debug", kind=bool, default=False, plan_field="debug",
            environ="DISTLIB_DEBUG",
            help="verbose launcher logs; each failing rank's traceback"),
    Setting(name="num_threads", kind=int, default=None, minimum=1, plan_field="num_threads",
            aliases=("--num-cpu-threads-per-process",),
            help=f"threads each rank's torch uses (default: {THREADS_DEFAULT})"),
    Setting(name="log_dir", kind=str, default=None, plan_field="log_dir", metavar="PATH",
            help="also write each rank's stdout and stderr to DIR/rank_N.log (N: the global "
                 "rank); the console still shows them"),
    Setting(name="ranks_filter", kind=str, default="all", plan_field="ranks_filter",
            metavar="LIST",
            help="ranks whose output the console shows, e.g. 0 or 0,2 (default: all); the "
                 "others still run and still write to --log-dir"),
    Setting(name="rank_prefix", kind=bool, default=None, plan_field="rank_prefix",
            help="start each console line of a rank with [rank N] (default: on when "
                 "--log-dir, --ranks-filter or --redirects is given and several ranks run)"),
    Setting(name="tee", kind=int, default=None, choices=(0, 1, 2, 3), plan_field="tee",
            aliases=("-t",),
            help="streams that --log-dir receives: 1 stdout, 2 stderr, 3 both (default 3)"),
    Setting(name="redirects", kind=int, default=0, choices=(0, 1, 2, 3),
            plan_field="redirects", aliases=("-r",),
            help="streams that go to --log-dir only, not the console: 1 stdout, 2 stderr, "
                 "3 both (default 0)"),
    Setting(name="quiet", kind=bool, default=False, plan_field="quiet", aliases=("-q",),
            help="silence the launcher's own notes (the ranks' output is still shown)"),
    _fsdp("reshard_after_forward", bool, "free gathered parameters after forward",
          question="FSDP: free gathered parameters after forward?", ask_when="fsdp",
          ask_order=10, offer=True),
    _fsdp("cpu_offload", bool, "keep parameters on the CPU",
          question="FSDP: keep parameters on the CPU?", ask_when="fsdp", ask_order=11,
          offer=False),
    _fsdp("wrap_classes", str, "comma-separated module classes that become FSDP units, or "
          "auto: the classes in the model's _no_split_modules", metavar="NAMES",
          question="FSDP: module classes to shard separately (comma-separated)?",
          ask_when="fsdp", ask_order=12, offer=""),
    _fsdp("min_num_params", int, "wrap modules with at least this many parameters"),
    _fsdp("activation_checkpointing", bool, "recompute activations in backward",
          question="FSDP: activation checkpointing?", ask_when="fsdp", ask_order=13,
          offer=False),
    _fsdp("state_dict_type", str, "checkpoint layout", choices=("sharded", "full"),
          question="FSDP: checkpoint layout?", ask_when="fsdp", ask_order=14,
          offer="sharded"),
    _fsdp("hybrid_shard", bool, "HSDP: replicate across machines, shard within each"),
    _fsdp("sync_module_states", bool, "broadcast rank 0's parameters and buffers before "
          "sharding"),
    _fsdp("forward_prefetch", bool, "each FSDP unit prefetches the next unit's all-gather in "
          "forward"),
    _mesh("dp_replicate", "mesh: replicas of the model (HSDP's replicate axis when "
          "dp_shard > 1; default 1)",
          question="FSDP: replicas of the model (dp_replicate; HSDP when > 1)?",
          ask_when="fsdp", ask_order=15, offer=1),
    _mesh("dp_shard", "mesh: ranks that shard the parameters (FSDP2); default: the ranks "
          "the other axes leave"),
    _mesh("cp", "mesh: context-parallel size (ranks that split one sequence; default 1)",
          question="FSDP: context-parallel size (cp)?", ask_when="fsdp", ask_order=16,
          offer=1),
    _mesh("tp", "mesh: tensor-parallel size (ranks that split each layer; default 1)",
          question="FSDP: tensor-parallel size (tp)?", ask_when="fsdp", ask_order=17, offer=1),
    _ds("deepspeed_config_file", "config", str, "a DeepSpeed JSON config", metavar="PATH"),
    _ds("zero_stage", "zero_stage", int, "ZeRO stage", choices=(0, 1, 2, 3),
        question="DeepSpeed: ZeRO stage?", ask_when="deepspeed", ask_order=18, offer=2),
    _ds("offload_optimizer_device", "offload_optimizer", str, "where optimizer states live",
        choices=_OFF_ON, question="DeepSpeed: offload optimizer states to?",
        ask_when="deepspeed", ask_order=19, offer="none"),
    _ds("offload_param_device", "offload_param", str, "where parameters live",
        choices=_OFF_ON, question="DeepSpeed: offload parameters to?", ask_when="deepspeed",
        ask_order=20, offer="none"),
    _ds("gradient_accumulation_steps", "gradient_accumulation_steps", int,
        "micro-steps per optimizer step"),
    _ds("gradient_clipping", "gradient_clipping", float, "clip gradients to this norm",
        metavar="NORM"),
    _ds("offload_optimizer_nvme_path", "offload_optimizer_nvme_path", str,
        "folder for optimizer states offloaded to NVMe", metavar="PATH"),
    _ds("offload_param_nvme_path", "offload_param_nvme_path", str,
        "folder for parameters offloaded to NVMe", metavar="PATH"),
    _ds("zero3_save_16bit_model", "gather_16bit_weights_on_save", bool,
        "under ZeRO-3, gather 16-bit weights when DeepSpeed saves the model"),
)

# The same table, by name (read-only).
SETTINGS: Mapping[str, Setting] = types.MappingProxyType({s.name: s for s in TABLE})
