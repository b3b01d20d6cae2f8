"""``distlib launch``: run a script, a module or a program in N ranks from flags and config.

The flags are generated from the settings table (`distlib.launcher.settings.TABLE`), with
Accelerate's and torchrun's spellings as aliases (``--master-addr``, ``--mixed_precision``) and
their shortcuts (``--use_fsdp``, ``--standalone``, ``--rdzv-endpoint``) turned into distlib's
settings here; resolution is pure (`distlib.launcher.config`); this module only parses,
prints and waits.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from distlib.cli import BROKEN_PIPE_EXIT
from distlib.cli._args import Parser, Switch, spellings
from distlib.errors import ConfigError
from distlib.launcher._backends import missing_backend
from distlib.launcher._environ import child_environ, rank_threads
from distlib.launcher.config import ConfigFile, ignored_settings, resolve_sources, to_plan
from distlib.launcher.launcher import check_port, free_port, root_cause_message, run_plan
from distlib.launcher.plan import DEFAULT_TIMEOUT_S, LaunchPlan, mesh_text, plan_output
from distlib.launcher.settings import SETTINGS, TABLE, THREADS_DEFAULT, Setting
from distlib.strategies import FSDP, DeepSpeed
from distlib.topology import AXES, Mesh

__all__ = ["SHORTCUTS", "add_arguments", "add_setting_arguments", "alias_forms",
           "dry_run_text", "mesh_text_rows", "resolve_config", "resolve_from_args", "run"]

# Accelerate's strategy switches -> the --strategy they mean.
SHORTCUTS = {"--multi_gpu": "ddp", "--use_fsdp": "fsdp", "--use_deepspeed": "deepspeed"}
# torchrun's --nproc-per-node words, which distlib's count does not take.
_NPROC_WORDS = ("gpu", "cpu", "auto")
_RDZV_CONF_WHY = (
    "distlib sets torch's rendezvous options itself: timeout and join_timeout from --timeout "
    "SECONDS, is_host from --machine-rank; it has no setting for the others "
    "(last_call_timeout, close_timeout, read_timeout). Pass --timeout SECONDS instead, or drop "
    "--rdzv-conf.")

_GROUPS = {"launch": "processes and machines",
           "mesh": "mesh: dp_replicate x dp_shard x cp x tp (their product is the number of "
                   "processes)",
           "fsdp": "FSDP options (--strategy fsdp)",
           "deepspeed": "DeepSpeed options (--strategy deepspeed)"}
_STRATEGY_VALUES = {"fsdp": FSDP, "deepspeed": DeepSpeed}
_OWNERS = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}


def alias_forms(setting: Setting) -> tuple[str, ...]:
    """Every flag of ``setting`` besides its own: each alias as written, then its other
    spelling (``--main_process_ip`` and ``--main-process-ip``).

    Example:
        >>> alias_forms(SETTINGS["main_address"])
        ('--main_process_ip', '--main-process-ip', '--master-addr', '--master_addr')
    """
    forms = []
    for alias in setting.aliases:
        forms += [alias] if not alias.startswith("--") else [  # "-q" has one spelling
            alias, "--" + alias[2:].replace("_", "-"), "--" + alias[2:].replace("-", "_")]
    return tuple(dict.fromkeys(f for f in forms if f not in spellings(setting.flag)))


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value in ((), "") else str(value)


def _help(setting: Setting) -> str:
    """The setting's help, with its default (unless the text says it) and its aliases."""
    text = setting.help
    if "default" not in text:
        default = setting.default
        if setting.strategy_option is not None:
            owner, option = setting.strategy_option
            fields = {f.name: f for f in dataclasses.fields(_STRATEGY_VALUES[owner])}
            default = fields[option].default
            if default is None:
                default = "none" if setting.kind is str else f"{_OWNERS[owner]}'s own"
        text += f" (default: {_shown(default)})"
    aliases = [a for a in alias_forms(setting) if a in setting.aliases]
    return text + (f"; also {', '.join(aliases)}" if aliases else "")


def _metavar(setting: Setting) -> str:
    if setting.choices:
        return "{" + ",".join(map(str, setting.choices)) + "}"
    return setting.metavar or {int: "N", float: "SECONDS"}.get(setting.kind, "VALUE")


def _whole_number(flag: str) -> Any:
    """argparse's ``type`` for a count: a whole number, with torchrun's words explained."""
    def parse(text: str) -> int:
        if flag == "--nproc-per-node" and text.strip().lower() in _NPROC_WORDS:
            msg = (f"must be a whole number, but got {text!r} (torchrun's word). Leave it out: "
                   "distlib starts one rank per visible GPU (else 1), like torchrun's 'gpu'; "
                   "pass a number for any other count.")
            raise argparse.ArgumentTypeError(msg)
        try:
            return int(text)
        except ValueError:
            msg = f"must be a whole number, but got {text!r}."
            raise argparse.ArgumentTypeError(msg) from None
    return parse


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per launcher setting, plus ``--config-file`` and Accelerate's and
    torchrun's shortcuts (shared with ``test``)."""
    if type(parser) is argparse.ArgumentParser:
        parser.__class__ = Parser  # "did you mean" until `distlib.cli` builds a Parser itself
    parser.add_argument(*spellings("--config-file"), default=None, metavar="PATH",
                        help="YAML config (distlib's or Accelerate's); default: "
                             "$DISTLIB_CONFIG_FILE, else ~/.cache/distlib/default_config.yaml, "
                             "else Accelerate's default_config.yaml")
    groups = {key: parser.add_argument_group(title) for key, title in _GROUPS.items()}
    for setting in TABLE:
        group = groups[setting.group]
        kwargs: dict[str, Any] = {"dest": setting.name, "default": None, "help": _help(setting)}
        if setting.kind is bool:
            action = group.add_argument(*Switch.flags(setting.flag), *alias_forms(setting),
                                        action=Switch, **kwargs)
            action.shown = Switch.flags(setting.flag)[:2]  # type: ignore[attr-defined]
            continue
        kwargs["type"] = _whole_number(setting.flag) if setting.kind is int else setting.kind
        kwargs["metavar"] = _metavar(setting)
        if setting.choices:
            kwargs["choices"] = setting.choices
        action = group.add_argument(*spellings(setting.flag), *alias_forms(setting), **kwargs)
        action.shown = (setting.flag,)  # type: ignore[attr-defined]
    _add_shortcuts(parser)


class _Shortcut(argparse.Action):
    """Accelerate's ``--use_fsdp``-like switch: remembers which one was typed."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=[], **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        typed = getattr(namespace, self.dest) or []
        setattr(namespace, self.dest, [*typed, option_string or self.option_strings[0]])


class _Refused(argparse.Action):
    """A flag of another launcher that distlib cannot honour: an error naming why."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        parser.error(f"{option_string} must be left out (distlib cannot honour it), but got "
                     f"{option_string} {values}. {_RDZV_CONF_WHY}")


def _add_shortcuts(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Accelerate's and torchrun's flags (see "
                                      "docs/migration.md; their other spellings are aliases)")
    for flag, strategy in SHORTCUTS.items():
        dashed = flag.replace("_", "-")
        action = group.add_argument(flag, *spellings(dashed)[:1], dest="strategy_shortcuts",
                                    action=_Shortcut,
                                    help=f"Accelerate's: the same as --strategy {strategy}")
        action.shown = (flag,)  # type: ignore[attr-defined]
    group.add_argument("--standalone", action="store_true", default=False,
                       help="torchrun's: one machine, rendezvous on 127.0.0.1 at a free port "
                            "(the same as --num-machines 1 --main-port 0; default: off)")
    action = group.add_argument(*spellings("--rdzv-endpoint"), default=None,
                                metavar="HOST:PORT",
                                help="torchrun's: the same as --main-address HOST --main-port "
                                     "PORT")
    action.shown = ("--rdzv-endpoint",)  # type: ignore[attr-defined]
    action = group.add_argument(*spellings("--rdzv-conf"), action=_Refused, metavar="KEY=VALUE,...",
                                help="torchrun's: refused, distlib sets the rendezvous options "
                                     "itself (use --timeout)")
    action.shown = ("--rdzv-conf",)  # type: ignore[attr-defined]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's options."""
    parser.usage = "distlib launch [options] (script.py | -m module | --no-python prog) [args]"
    add_setting_arguments(parser)
    parser.add_argument("-m", "--module", action="store_true",
                        help="run the target as a module, like python -m")
    parser.add_argument(*spellings("--no-python"), action="store_true",
                        help="run the target as a program, not through python")
    parser.add_argument(*spellings("--dry-run"), action="store_true",
                        help="print every resolved setting with its source, then exit")
    parser.add_argument("script", help="the script, module or program each rank runs")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")


def resolve_from_args(args: argparse.Namespace, environ: Mapping[str, str]
                      ) -> tuple[dict[str, tuple[Any, str]], str | None]:
    """Resolved settings (value, source) from flags, the config file and the environment."""
    resolved, config = resolve_config(args, environ)
    return resolved, config.path if config else None


def resolve_config(args: argparse.Namespace, environ: Mapping[str, str]
                   ) -> tuple[dict[str, tuple[Any, str]], ConfigFile | None]:
    """`resolve_from_args`, with the config file read (its notes) instead of its path.

    Prints a note on stderr when Accelerate's default config file is read, and when the file's
    options of a strategy not in use are ignored.
    """
    flags = {s.name: getattr(args, s.name, None) for s in TABLE
             if getattr(args, s.name, None) is not None}
    typed = _shortcut_flags(args, flags)
    resolved, config = resolve_sources(flags, args.config_file, environ)
    for name, flag in typed.items():
        resolved[name] = (resolved[name][0], f"flag ({flag})")
    if config is not None and config.found:
        print(f"distlib: note: no distlib config file, so {config.found.split(' (')[0]} is "
              f"read: {config.path} (pass --config-file to choose another, or write "
              "distlib's with `distlib config`)", file=sys.stderr)
    ignored = ignored_settings(resolved)
    if ignored:
        sources = sorted({resolved[name][1] for name in ignored})
        print(f"distlib: note: {', '.join(ignored)} from {', '.join(sources)} ignored "
              f"({next(iter(ignored.values()))})", file=sys.stderr)
    return resolved, config


def _shortcut_flags(args: argparse.Namespace, flags: dict[str, Any]) -> dict[str, str]:
    """Turn ``--use_fsdp``, ``--standalone`` and ``--rdzv-endpoint`` into settings in
    ``flags``; return which flag set each."""
    typed: dict[str, str] = {}
    shortcuts = getattr(args, "strategy_shortcuts", None) or []
    for flag in shortcuts:
        strategy = SHORTCUTS["--" + flag[2:].replace("-", "_")]
        _put(flags, typed, flag, strategy=strategy)
    endpoint = getattr(args, "rdzv_endpoint", None)
    if endpoint is not None:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            msg = (f"command line: --rdzv-endpoint must be HOST:PORT, but got {endpoint!r}. "
                   "E.g. --rdzv-endpoint 10.0.0.1:29500 (or --main-address and --main-port).")
            raise ConfigError(msg)
        _put(flags, typed, "--rdzv-endpoint", main_address=host, main_port=int(port))
    if getattr(args, "standalone", False):
        _put(flags, typed, "--standalone", num_machines="1", machine_rank=0,
             main_address="127.0.0.1", main_port=0)
    return typed


def _put(flags: dict[str, Any], typed: dict[str, str], flag: str, **values: Any) -> None:
    for name, value in values.items():
        if flags.get(name) not in (None, value):
            own = f"{SETTINGS[name].flag} {flags[name]}"
            given = f"{typed[name]} ({own})" if name in typed else own
            msg = (f"command line: {flag} means {SETTINGS[name].flag} {value}, but {given} "
                   "was given too. Keep one of the two.")
            raise ConfigError(msg)
        flags[name], typed[name] = value, flag


def _threads_text(plan: LaunchPlan, environ: Mapping[str, str]) -> tuple[str, str]:
    """What ``num_threads`` unset amounts to, and where that comes from."""
    if environ.get("OMP_NUM_THREADS"):
        return environ["OMP_NUM_THREADS"], "environment (OMP_NUM_THREADS)"
    if plan.cpu and plan.nproc_per_node:
        cores = os.cpu_count() or 1
        if hasattr(os, "sched_getaffinity"):
            cores = len(os.sched_getaffinity(0))
        threads = rank_threads(plan, environ, nproc=plan.nproc_per_node, gpu_ranks=False,
                               num_cpus=cores)
        if threads is not None:
            return (f"{threads} ({cores} cores shared among {plan.nproc_per_node} CPU ranks)",
                    "derived")
    return THREADS_DEFAULT, "default"


def dry_run_text(resolved: Mapping[str, tuple[Any, str]], plan: LaunchPlan,
                 command: list[str], config: ConfigFile | None = None,
                 environ: Mapping[str, str] | None = None) -> str:
    """The ``--dry-run`` report: every setting with its value and source, then every key of
    the config file and what became of it."""
    derived = {"main_port": plan.main_port or "0 (a free port is picked at launch)",
               "nproc_per_node": plan.nproc_per_node or "visible GPUs, else 1",
               "strategy": ("auto: fsdp (tensor/context parallel mesh)"
                            if plan.mesh is not None and not plan.mesh.is_data_parallel_only
                            else "auto: ddp for several ranks, else single"),
               "timeout": f"{DEFAULT_TIMEOUT_S} s", "stall_timeout": "off",
               "rank_prefix": "auto: " + ("on" if plan_output(plan, plan.world_size).prefix
                                          else "off (the ranks keep the terminal)"),
               "tee": "3 (both streams)" if plan.log_dir else "(no --log-dir)"}
    ignored = ignored_settings(resolved)
    if plan.world_size is not None:
        derived["num_processes"] = plan.world_size
    rows = []
    for name, (value, source) in resolved.items():
        axis = SETTINGS[name].mesh_axis
        if name in ignored:
            source = f"{source} (ignored: {ignored[name]})"
        if value is None and axis is not None:
            value, source = _unset_axis(plan.mesh, axis)
        elif value is None and SETTINGS[name].group != "launch":
            continue  # an option of a strategy not in use
        elif name == "num_threads" and value is None:
            value, source = _threads_text(plan, os.environ if environ is None else environ)
        elif value is None:
            known = {"nproc_per_node": plan.nproc_per_node, "num_processes": plan.world_size}
            value, source = derived.get(name, "(not set)"), (
                "derived" if known.get(name) and source == "default" else source)
        rows.append((name, str(value), source))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = [f"{'setting':<{width}}  {'value':<{vwidth}}  source"]
    lines += [f"{n:<{width}}  {v:<{vwidth}}  {s}" for n, v, s in rows]
    if config is not None and config.notes:
        kind = "Accelerate" if config.accelerate else "distlib"
        found = f"; {config.found}" if config.found else ""
        lines.append(f"\nconfig file {config.path} ({kind} format{found}), key by key:")
        lines += [f"  {note.row()}" for note in config.notes]
    lines += ["", *mesh_text_rows(plan)]
    lines.append(f"\neach rank runs: {' '.join(command)}")
    return "\n".join(lines)


def _unset_axis(mesh: Mesh | None, axis: str) -> tuple[str, str]:
    """What an axis size left unset amounts to, and where that comes from."""
    if mesh is None:
        return "(not set: all data parallel)", "default"
    size = getattr(mesh, axis)
    if size == -1:
        return "the ranks the other axes leave", "derived in each rank"
    return str(size), "derived" if axis == mesh.inferred else "default"


def _fsdp_layout(mesh: Mesh) -> str:
    """How `wrap` lays FSDP over ``mesh`` (torchtitan's order: TP, CP, then FSDP2)."""
    parts = [f"tensor parallel over tp={mesh.tp}"] if mesh.tp > 1 else []
    parts += [f"context parallel over cp={mesh.cp}"] if mesh.cp > 1 else []
    hsdp = " (HSDP)" if mesh.dp_replicate > 1 and mesh.dp_shard > 1 else ""
    parts.append(f"fully_shard over dp_replicate={mesh.dp_replicate} x "
                 f"dp_shard={mesh.dp_shard}{hsdp}")
    return ", then ".join(parts)


def mesh_text_rows(plan: LaunchPlan) -> list[str]:
    """The ``--dry-run`` lines about the mesh: its sizes, then each rank's coordinates and
    which ranks read the same batches (a tp/cp group).

    Example:
        >>> print("\\n".join(mesh_text_rows(LaunchPlan(nproc_per_node=4, mesh="tp=2"))))
        mesh: dp_shard=2 x tp=2 (DISTLIB_MESH=dp_replicate=1,dp_shard=2,cp=1,tp=2), strategy auto
        rank  dp_replicate  dp_shard  cp  tp  batches of data-parallel rank
           0             0         0   0   0  0 of 2
           1             0         0   0   1  0 of 2
           2             0         1   0   0  1 of 2
           3             0         1   0   1  1 of 2
        ranks that share a batch: 0 1 | 2 3
    """
    strategy = plan.strategy or "auto"
    if plan.mesh is None:
        return [f"mesh: not set: all data parallel (every rank reads its own batches), "
                f"strategy {strategy}"]
    head = f"mesh: {plan.mesh} (DISTLIB_MESH={mesh_text(plan.mesh)}), strategy {strategy}"
    if not plan.mesh.is_resolved:
        return [head, "  (coordinates: once the number of processes is known, in each rank)"]
    mesh = plan.mesh
    if strategy == "fsdp":
        head += f": {_fsdp_layout(mesh)}"
    widths = [len(axis) for axis in AXES]
    lines = [head, "rank  " + "  ".join(AXES) + "  batches of data-parallel rank"]
    for rank in range(mesh.world_size):
        place = mesh.coordinates(rank)
        cells = "  ".join(f"{place[axis]:>{w}}" for axis, w in zip(AXES, widths, strict=True))
        lines.append(f"{rank:>4}  {cells}  {mesh.dp_rank(rank)} of {mesh.dp_size}")
    groups = mesh.groups(["cp", "tp"])
    lines.append("ranks that share a batch: " + (
        " | ".join(" ".join(map(str, g)) for g in groups) if len(groups[0]) > 1
        else "none (every rank reads its own batches)"))
    return lines


def _command(args: argparse.Namespace) -> list[str]:
    if args.no_python:
        return [args.script, *args.script_args]
    kind = "module" if args.module else "script"
    if kind == "script" and not os.path.isfile(args.script):
        msg = (f"the script must exist, but got {args.script!r} (no such file "
               f"from {os.getcwd()!r}). Pass -m for a module or --no-python for a program.")
        raise ConfigError(msg)
    return [sys.executable, "-u", "-m", "distlib.launcher._bootstrap", kind, args.script,
            *args.script_args]


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Resolve, then launch (or print with ``--dry-run``); return the job's exit code.

    ``args.agent`` may hold an agent process the command line started early; without it
    the agent is started when the plan is ready.
    """
    return _run(args, getattr(args, "agent", None))


def _run(args: argparse.Namespace, agent: Any) -> int:
    resolved, config = resolve_config(args, os.environ)
    plan = to_plan(resolved)
    command = _command(args)
    if args.dry_run:
        print(dry_run_text(resolved, plan, command, config, os.environ))
        return 0
    missing = missing_backend(plan)  # one line naming the extra, before any process starts
    if missing is not None:
        raise ConfigError(missing)
    check_port(plan)
    if plan.main_port == 0:
        plan = dataclasses.replace(plan, main_port=free_port())
    signal.signal(signal.SIGTERM, _raise_interrupt)
    with tempfile.TemporaryDirectory(prefix="distlib-launch-") as work_dir:
        try:
            outcome = run_plan(plan, command, environ=child_environ(os.environ, plan),
                               work_dir=work_dir, agent=agent, call="distlib launch")
        except KeyboardInterrupt:
            print("distlib launch: interrupted; every rank was stopped.", file=sys.stderr)
            return 130
    if outcome.ok:
        return 0
    if any(f.console_closed for f in outcome.failures):
        return BROKEN_PIPE_EXIT  # the reader went away (`| head`): end quietly, as `yes` does
    print(root_cause_message("distlib launch", outcome.failures, outcome.stopped_by,
                             every_traceback=plan.debug, outcome=outcome), file=sys.stderr)
    codes = [f.exitcode for f in outcome.failures if f.exitcode > 0]
    return codes[0] if codes else 1
