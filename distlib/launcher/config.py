"""Launcher settings: the table of options, config files (distlib's and Accelerate's), and
which source each resolved value came from. Pure except `read_config_file`; torch-free.

distlib's own config file is flat YAML whose keys are the option names of ``distlib launch``
(``num_processes: 2``, ``precision: bf16``, ``fsdp_cpu_offload: true``...). A file in
Accelerate's ``default_config.yaml`` format (recognised by its keys) is translated as is.
Precedence: command-line flag > config file > environment > default; inside a SLURM
allocation the machine count, machine rank and main address come from SLURM unless a flag
sets them (a config file cannot know the allocation).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from distlib._slurm import expand_nodelist
from distlib.errors import ConfigError
from distlib.launcher._accelerate_config import KeyNote, problems_message, translate_all
from distlib.launcher.plan import DEFAULT_TIMEOUT_S, LaunchPlan, plan_launch

__all__ = ["SETTINGS", "ConfigFile", "KeyNote", "Setting", "default_config_path",
           "from_accelerate", "read_config", "read_config_data", "read_config_file", "resolve", "to_plan",
           "validate"]

_BOOL = ("true", "false")


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """One launcher option: its type, default, valid choices and help text."""

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    group: str = "launch"
    minimum: int | None = None
    aliases: tuple[str, ...] = ()


def _s(name: str, kind: type, default: Any, text: str, choices: tuple[Any, ...] = (),
       group: str = "launch", minimum: int | None = None,
       aliases: tuple[str, ...] = ()) -> Setting:
    return Setting(name=name, kind=kind, default=default, help=text, choices=choices,
                   group=group, minimum=minimum, aliases=aliases)


THREADS_DEFAULT = ("$OMP_NUM_THREADS, else the machine's cores shared among its CPU ranks; "
                   "1 per GPU rank")


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    _s("num_processes", int, None, "total number of ranks across all machines "
       "(default: visible GPUs per machine, else 1)"),
    _s("nproc_per_node", int, None, "ranks on each machine (alternative to --num-processes)"),
    _s("num_machines", str, "1", "number of machines, or MIN:MAX for an elastic job"),
    _s("machine_rank", int, 0, "rank of this machine (0 hosts the rendezvous)"),
    _s("main_address", str, "127.0.0.1", "address of machine 0"),
    _s("main_port", int, None, "rendezvous port on machine 0 (0: pick a free one; default "
       "0 on one machine, 29500 on several)"),
    _s("rdzv_backend", str, "static", "rendezvous backend", ("static", "c10d")),
    _s("max_restarts", int, 0, "restart the whole group this many times after a failure"),
    _s("monitor_interval", float, 0.1, "seconds between checks of the ranks' health"),
    _s("cpu", bool, False, "run on CPUs even when GPUs are present"),
    _s("gpu_ids", str, "all", "GPUs to use on this machine, e.g. 0,1 (default: all)"),
    _s("precision", str, "no", "mixed precision", ("no", "fp16", "bf16", "fp8")),
    _s("strategy", str, None, "how the model is distributed (default: ddp for several "
       "ranks, else single)", ("single", "ddp", "fsdp", "deepspeed", "xla")),
    _s("timeout", int, None, "seconds the rendezvous and each collective may wait (default "
       f"{DEFAULT_TIMEOUT_S})", minimum=1),
    _s("stall_timeout", float, None, "seconds a rank may wait in one collective before the "
       "job is stopped with a report of where every rank is (default: off, only --timeout)"),
    _s("start_method", str, "auto", "how Python ranks start: fork from the agent (fast, "
       "CPU only), spawn fresh interpreters, or auto (fork when no GPU is used)",
       ("auto", "fork", "spawn")),
    _s("debug", bool, False, "verbose launcher logs; each failing rank's traceback"),
    _s("num_threads", int, None, f"threads each rank's torch uses (default: {THREADS_DEFAULT})",
       minimum=1, aliases=("--num-cpu-threads-per-process",)),
    _s("fsdp_reshard_after_forward", bool, None, "free gathered parameters after forward",
       group="fsdp"),
    _s("fsdp_cpu_offload", bool, None, "keep parameters on the CPU", group="fsdp"),
    _s("fsdp_wrap_classes", str, None, "comma-separated module classes that become FSDP "
       "units, or auto: the classes in the model's _no_split_modules", group="fsdp"),
    _s("fsdp_min_num_params", int, None, "wrap modules with at least this many parameters",
       group="fsdp"),
    _s("fsdp_activation_checkpointing", bool, None, "recompute activations in backward",
       group="fsdp"),
    _s("fsdp_state_dict_type", str, None, "checkpoint layout", ("sharded", "full"),
       group="fsdp"),
    _s("fsdp_hybrid_shard", bool, None, "HSDP: replicate across machines, shard within each",
       group="fsdp"),
    _s("fsdp_sync_module_states", bool, None, "broadcast rank 0's parameters and buffers "
       "before sharding", group="fsdp"),
    _s("fsdp_forward_prefetch", bool, None, "each FSDP unit prefetches the next unit's "
       "all-gather in forward", group="fsdp"),
    _s("deepspeed_config_file", str, None, "a DeepSpeed JSON config", group="deepspeed"),
    _s("zero_stage", int, None, "ZeRO stage", (0, 1, 2, 3), group="deepspeed"),
    _s("offload_optimizer_device", str, None, "where optimizer states live",
       ("none", "cpu", "nvme"), group="deepspeed"),
    _s("offload_param_device", str, None, "where parameters live", ("none", "cpu", "nvme"),
       group="deepspeed"),
    _s("gradient_accumulation_steps", int, None, "micro-steps per optimizer step",
       group="deepspeed"),
    _s("gradient_clipping", float, None, "clip gradients to this norm", group="deepspeed"),
    _s("offload_optimizer_nvme_path", str, None, "folder for optimizer states offloaded to "
       "NVMe", group="deepspeed"),
    _s("offload_param_nvme_path", str, None, "folder for parameters offloaded to NVMe",
       group="deepspeed"),
    _s("zero3_save_16bit_model", bool, None, "under ZeRO-3, gather 16-bit weights when "
       "DeepSpeed saves the model", group="deepspeed"),
)}

# Setting -> (strategy, its option name)
_STRATEGY_OPTION = {
    "fsdp_reshard_after_forward": ("fsdp", "reshard_after_forward"),
    "fsdp_cpu_offload": ("fsdp", "cpu_offload"),
    "fsdp_wrap_classes": ("fsdp", "wrap_classes"),
    "fsdp_min_num_params": ("fsdp", "min_num_params"),
    "fsdp_activation_checkpointing": ("fsdp", "activation_checkpointing"),
    "fsdp_state_dict_type": ("fsdp", "state_dict_type"),
    "fsdp_hybrid_shard": ("fsdp", "hybrid_shard"),
    "fsdp_sync_module_states": ("fsdp", "sync_module_states"),
    "fsdp_forward_prefetch": ("fsdp", "forward_prefetch"),
    "deepspeed_config_file": ("deepspeed", "config"),
    "zero_stage": ("deepspeed", "zero_stage"),
    "offload_optimizer_device": ("deepspeed", "offload_optimizer"),
    "offload_param_device": ("deepspeed", "offload_param"),
    "gradient_accumulation_steps": ("deepspeed", "gradient_accumulation_steps"),
    "gradient_clipping": ("deepspeed", "gradient_clipping"),
    "offload_optimizer_nvme_path": ("deepspeed", "offload_optimizer_nvme_path"),
    "offload_param_nvme_path": ("deepspeed", "offload_param_nvme_path"),
    "zero3_save_16bit_model": ("deepspeed", "gather_16bit_weights_on_save"),
}


def default_config_path(environ: Mapping[str, str], *, writing: bool = False) -> str:
    """``$DISTLIB_CONFIG_FILE``, else ``${XDG_CACHE_HOME:-~/.cache}/distlib/default_config.yaml``.

    A ``DISTLIB_CONFIG_FILE`` that names no file is an error (a typo there would otherwise
    launch with none of its settings), unless ``writing`` (``distlib config`` creates it).
    The cache path is returned whether or not a file is there.

    Raises:
        ConfigError: ``DISTLIB_CONFIG_FILE`` names no file and ``writing`` is False.

    Example:
        >>> default_config_path({"XDG_CACHE_HOME": "/c"})
        '/c/distlib/default_config.yaml'

    Effects: looks at the file system when ``DISTLIB_CONFIG_FILE`` is set.
    """
    if environ.get("DISTLIB_CONFIG_FILE"):
        path = environ["DISTLIB_CONFIG_FILE"]
        if not writing and not os.path.isfile(path):
            why = "a folder" if os.path.isdir(path) else "no file"
            msg = (f"config file: DISTLIB_CONFIG_FILE must name an existing file, but got "
                   f"DISTLIB_CONFIG_FILE={path!r}, which is {why}. Fix the path, write the file "
                   "with `distlib config`, or unset the variable.")
            raise ConfigError(msg)
        return path
    home = environ.get("HOME") or os.path.expanduser("~")
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return os.path.join(cache, "distlib", "default_config.yaml")


def _bad(where: str, key: str, value: Any, rule: str, fix: str = "") -> ConfigError:
    prefix = f"{where}: " if where else ""
    name = key if key.startswith("`") else f"`{key}`"  # already quoted: "`a` (distlib's `b`)"
    return ConfigError(f"{prefix}{name} must {rule}, but got {value!r}. {fix}".rstrip())


def _convert(where: str, setting: Setting, value: Any, label: str | None = None) -> Any:
    """Check one value's type and choices; return it in its canonical form.

    ``label`` is the key as the user wrote it (``mixed_precision`` for ``precision``).
    """
    if value is None:
        return None
    kind, key = setting.kind, label or setting.name
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in (*_BOOL, "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise _bad(where, key, value, "be true or false")
    elif kind is int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, key, value, "be a whole number")
        if setting.minimum is not None and value < setting.minimum:
            raise _bad(where, key, value, f"be >= {setting.minimum}")
    elif kind is float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise _bad(where, key, value, "be a number") from None
    elif kind is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise _bad(where, key, value, "be a string")
        value = value.strip()
        if setting.choices:
            value = value.lower()
    if setting.choices and value not in setting.choices:
        raise _bad(where, key, value, f"be one of {', '.join(map(repr, setting.choices))}")
    return value


def _check_all(values: Mapping[str, Any], origins: Mapping[str, str]
               ) -> tuple[dict[str, Any], list[str]]:
    """Convert every value; collect one problem per bad key instead of stopping at the first."""
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in values.items():
        written = origins.get(key, key)
        label = written if written == key else f"`{written}` (distlib's `{key}`)"
        if key not in SETTINGS:
            near = difflib.get_close_matches(str(key), list(SETTINGS), n=1)
            hint = f"Did you mean `{near[0]}`?" if near else "Remove it."
            problems.append(str(_bad("", str(key), value, "name a setting; valid keys are "
                                     + ", ".join(SETTINGS),
                                     fix=f"Unknown key `{key}`. {hint}")))
            continue
        try:
            out[key] = _convert("", SETTINGS[key], value, label)
        except ConfigError as error:
            problems.append(str(error))
    return out, problems


def validate(values: Mapping[str, Any], where: str,
             origins: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Check a mapping of distlib settings: known keys, right types, valid choices.

    Args:
        values: setting name -> raw value.
        where: the source, quoted first in errors (``config file x.yaml``, ``command line``).
        origins: setting name -> the key as the user wrote it, named in errors instead.

    Raises:
        ConfigError: listing every bad key at once, each with its value and the valid
            choices (or a close spelling).

    Example:
        >>> validate({"num_processes": "2", "cpu": "true"}, "flags")
        {'num_processes': 2, 'cpu': True}
    """
    out, problems = _check_all(values, origins or {})
    if problems:
        raise ConfigError(problems_message(where, problems))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigFile:
    """A config file read: its validated settings, and what became of each key it held."""

    path: str
    settings: dict[str, Any]
    notes: tuple[KeyNote, ...]
    accelerate: bool = False


def read_config(path: str) -> ConfigFile:
    """Read a distlib or Accelerate YAML config file, keeping a note for every key.

    Raises:
        ConfigError: the file is missing, not UTF-8, not YAML, or holds a key twice (at any
            level; YAML would keep the last silently); or, all listed at once, every unknown
            key, every key distlib cannot honour and every bad value, each named as written.

    Effects: reads the file.
    """
    where = f"config file {path}"
    return read_config_data(_load_yaml(path, where) or {}, where, path=path)


def read_config_data(data: Mapping[str, Any], where: str = "config",
                     path: str = "") -> ConfigFile:
    """`read_config` for an already parsed mapping (distlib's flat keys or Accelerate's).

    Raises:
        ConfigError: every unknown key, every key distlib cannot honour and every bad value,
            listed at once, each named as written.

    Example:
        >>> read_config_data({"distributed_type": "MULTI_CPU", "num_processes": "2"}).settings
        {'strategy': 'ddp', 'cpu': True, 'num_processes': 2}
    """
    if not data:
        return ConfigFile(path=path, settings={}, notes=())
    if not _looks_like_accelerate(data):
        notes = tuple(KeyNote(key=str(k), value=v, outcome="translated",
                              effect=f"{k}={v if not isinstance(v, bool) else str(v).lower()}")
                      for k, v in data.items())
        return ConfigFile(path=path, settings=validate(data, where), notes=notes)
    translation, problems = translate_all(data)
    settings, more = _check_all(translation.settings, translation.origins)
    problems += more
    if problems:
        raise ConfigError(problems_message(where, problems))
    return ConfigFile(path=path, settings=settings, notes=translation.notes, accelerate=True)


def read_config_file(path: str) -> dict[str, Any]:
    """Read a distlib or Accelerate YAML config file into validated distlib settings.

    Raises:
        ConfigError: the file is missing, not UTF-8, not YAML, holds a key twice, or has
            wrong keys, types or values.

    Effects: reads the file.
    """
    return read_config(path).settings


def _load_yaml(path: str, where: str) -> dict[str, Any] | None:
    import yaml

    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        msg = (f"{where}: the file must be readable, but got {error.strerror}. Write one with "
               "`distlib config` or pass --config-file.")
        raise ConfigError(msg) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        msg = (f"{where}: the file must be UTF-8 text, but got byte "
               f"0x{raw[error.start]:02x} at offset {error.start} (line {line}). Save it as "
               "UTF-8 (an editor's 'encoding' setting, or `iconv -t utf-8`).")
        raise ConfigError(msg) from None
    try:
        data = yaml.load(text, Loader=_unique_keys_loader(where))  # a SafeLoader subclass
    except yaml.YAMLError as error:
        msg = f"{where}: the file must be YAML, but got a parse error: {error}"
        raise ConfigError(msg) from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise _bad(where, "<top level>", data, "be a mapping of key: value")
    return data


def _unique_keys_loader(where: str) -> type:
    """A `yaml.SafeLoader` that refuses a key written twice in one mapping (at any depth)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults` may override keys, as YAML intends
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if not isinstance(key, Hashable):
                    break  # yaml's own error names an unhashable key
                if key in lines:
                    msg = (f"{where}: each key must appear once in a mapping, but got "
                           f"{key!r} twice (lines {lines[key]} and {line}); YAML would keep "
                           "the last silently. Delete the one you do not mean.")
                    raise ConfigError(msg)
                lines[key] = line
            return dict(super().construct_mapping(node, deep=deep))

    return UniqueKeys


def _looks_like_accelerate(data: Mapping[str, Any]) -> bool:
    marks = {"compute_environment", "distributed_type", "mixed_precision", "use_cpu",
             "main_process_ip", "main_process_port", "fsdp_config", "deepspeed_config"}
    return bool(marks & set(data))


def from_accelerate(data: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """Translate an Accelerate config mapping (see `distlib.launcher._accelerate_config`)."""
    from distlib.launcher._accelerate_config import from_accelerate as translate

    return translate(data, where)


def _slurm(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """Machine count, machine rank, main address and port that a SLURM allocation implies."""
    if "SLURM_JOB_ID" not in environ or "SLURM_NNODES" not in environ:
        return {}
    out: dict[str, tuple[Any, str]] = {"num_machines": (environ["SLURM_NNODES"].strip(),
                                                        "environment (SLURM_NNODES)")}
    if "SLURM_NODEID" in environ:
        out["machine_rank"] = (int(environ["SLURM_NODEID"]), "environment (SLURM_NODEID)")
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if nodelist:
        out["main_address"] = (expand_nodelist(nodelist)[0],
                               "environment (first host of SLURM_JOB_NODELIST)")
    job = environ["SLURM_JOB_ID"].strip()
    if job.isdigit():
        out["main_port"] = (15000 + int(job) % 50000, "environment (from SLURM_JOB_ID)")
    return out


_ENVIRONMENT = {"precision": "DISTLIB_PRECISION", "strategy": "DISTLIB_STRATEGY",
                "cpu": "DISTLIB_CPU", "debug": "DISTLIB_DEBUG", "timeout": "DISTLIB_TIMEOUT"}


def resolve(flags: Mapping[str, Any], config: Mapping[str, Any], environ: Mapping[str, str],
            *, config_source: str = "config file") -> dict[str, tuple[Any, str]]:
    """Resolve every setting to ``(value, source)`` by precedence.

    Args:
        flags: values given on the command line (None = not given).
        config: validated values from the config file.
        environ: the launcher's environment (``DISTLIB_*`` variables, SLURM).
        config_source: how to name the config file in sources.

    Example:
        >>> r = resolve({"precision": "bf16"}, {"precision": "fp16", "cpu": True}, {})
        >>> r["precision"], r["cpu"], r["max_restarts"]
        (('bf16', 'flag'), (True, 'config file'), (0, 'default'))
    """
    env_values = {k: (environ[v], f"environment ({v})") for k, v in _ENVIRONMENT.items()
                  if environ.get(v)}
    slurm = _slurm(environ)
    out: dict[str, tuple[Any, str]] = {}
    for name, setting in SETTINGS.items():
        if flags.get(name) is not None:
            out[name] = (flags[name], "flag")
        elif name in slurm:
            out[name] = slurm[name]
        elif config.get(name) is not None:
            out[name] = (config[name], config_source)
        elif name in env_values:
            value, source = env_values[name]
            out[name] = (_convert(source, setting, value), source)
        else:
            out[name] = (setting.default, "default")
    return out


def _strategy_options(values: Mapping[str, Any], strategy: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, (owner, option) in _STRATEGY_OPTION.items():
        if values.get(key) is None:
            continue
        if owner != strategy:
            raise _bad("launch settings", key, values[key], f"only be set with strategy "
                       f"{owner!r}", fix=f"The strategy is {strategy!r}; pass --strategy "
                       f"{owner} or drop `{key}`.")
        options[option] = values[key]
    return options


def to_plan(resolved: Mapping[str, tuple[Any, str]]) -> LaunchPlan:
    """Turn resolved settings into a `LaunchPlan`, rejecting impossible combinations.

    Example:
        >>> plan = to_plan(resolve({"num_processes": 2, "cpu": True}, {}, {}))
        >>> plan.nproc_per_node, plan.cpu, plan.main_port
        (2, True, 0)
    """
    v = {k: value for k, (value, _) in resolved.items()}
    strategy = v["strategy"]
    if v["cpu"] and strategy == "xla":
        raise _bad("launch settings", "strategy", strategy, "not be 'xla' when `cpu` is true",
                   fix="XLA runs on TPUs/XLA devices; drop --cpu, or pick 'ddp' or 'fsdp'.")
    if v["cpu"] and v["gpu_ids"] not in (None, "all"):
        raise _bad("launch settings", "gpu_ids", v["gpu_ids"], "be 'all' when `cpu` is true",
                   fix="--cpu uses no GPU; drop one of the two.")
    multi = v["num_machines"] not in ("1", 1)
    port = v["main_port"] if v["main_port"] is not None else (29500 if multi else 0)
    return plan_launch(
        num_processes=v["num_processes"], nproc_per_node=v["nproc_per_node"],
        num_machines=v["num_machines"], machine_rank=v["machine_rank"],
        main_address=v["main_address"], main_port=port, rdzv_backend=v["rdzv_backend"],
        max_restarts=v["max_restarts"], monitor_interval_s=v["monitor_interval"],
        cpu=v["cpu"], gpu_ids=v["gpu_ids"], precision=v["precision"], strategy=strategy,
        strategy_options=_strategy_options(v, strategy), debug=v["debug"],
        collective_timeout_s=v["timeout"], stall_timeout_s=v["stall_timeout"],
        start_method=v["start_method"],
        num_threads=v["num_threads"])


def flag_name(name: str) -> str:
    """The command-line spelling of a setting (``num_processes`` -> ``--num-processes``)."""
    return "--" + name.replace("_", "-")

