"""Launcher settings: the table of options, config files (distlib's and Accelerate's), and
which source each resolved value came from. Pure except `read_config_file`; torch-free.

distlib's own config file is flat YAML whose keys are the option names of ``distlib launch``
(``num_processes: 2``, ``precision: bf16``, ``fsdp_cpu_offload: true``...); the mesh may be
written as its four keys (``tp_size: 2``) or as one ``mesh:`` block (``mesh: {tp: 2}`` or
``mesh: "dp_shard=2,tp=2"``). A file in
Accelerate's ``default_config.yaml`` format (recognised by its keys) is translated as is.
Precedence: command-line flag > config file > environment > default; inside a SLURM
allocation the machine count, machine rank and main address come from SLURM unless a flag
sets them (a config file cannot know the allocation). A flag for one of the two process
counts (``--num-processes``, ``--nproc-per-node``) overrides the file's other one too, and the
file's options of a strategy not in use (an FSDP file run with ``--strategy ddp``) are
ignored, shown as such (`ignored_settings`); the same option typed as a flag is an error.
Without a distlib config file, Accelerate's default one (`accelerate_config_path`) is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from distlib._slurm import slurm_rendezvous
from distlib.env import FALSE_WORDS, TRUE_WORDS, parse_bool
from distlib.errors import ConfigError
from distlib.launcher._accelerate_config import KeyNote, problems_message, translate_all
from distlib.launcher._accelerate_config import from_accelerate as translate
from distlib.launcher.plan import LaunchPlan, plan_launch
from distlib.launcher.settings import MESH_VARIABLE, SETTINGS, TABLE, Setting, flag_name
from distlib.topology import AXES, Mesh, parse_mesh

__all__ = ["ConfigFile", "KeyNote", "accelerate_config_path", "default_config_path",
           "from_accelerate", "ignored_settings", "read_config", "read_config_data",
           "read_config_file", "resolve", "resolve_sources", "to_plan", "validate"]

# The two process counts: a flag for either overrides what the config file says of both.
_COUNTS = ("num_processes", "nproc_per_node")


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


def accelerate_config_path(environ: Mapping[str, str]) -> str:
    """Where ``accelerate launch`` looks for its default config: Accelerate's rule.

    ``$HF_HOME/accelerate/default_config.yaml``, else
    ``${XDG_CACHE_HOME:-~/.cache}/huggingface/accelerate/default_config.yaml`` (as
    ``accelerate.commands.config.config_args``; Accelerate reads no variable naming the file
    itself). The path is returned whether or not a file is there.

    Example:
        >>> accelerate_config_path({"HF_HOME": "/hf"})
        '/hf/accelerate/default_config.yaml'
        >>> accelerate_config_path({"HOME": "/u"})
        '/u/.cache/huggingface/accelerate/default_config.yaml'
    """
    home = environ.get("HOME") or os.path.expanduser("~")
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    hf_home = environ.get("HF_HOME") or os.path.join(cache, "huggingface")
    if hf_home == "~" or hf_home.startswith("~/"):
        hf_home = home + hf_home[1:]
    return os.path.join(hf_home, "accelerate", "default_config.yaml")


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
        truth = parse_bool(value)
        if truth is None:
            raise _bad(where, key, value, "be true or false",
                       "Write one of " + ", ".join(TRUE_WORDS + FALSE_WORDS) + ".")
        return truth
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
    """A config file read: its validated settings, and what became of each key it held.

    ``found`` says why the file was read when nothing named it (``"Accelerate's default
    config file (distlib has none)"``); empty when ``--config-file``, ``DISTLIB_CONFIG_FILE``
    or distlib's own default named it.
    """

    path: str
    settings: dict[str, Any]
    notes: tuple[KeyNote, ...]
    accelerate: bool = False
    found: str = ""


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
        flat = _expand_mesh(data, where)
        notes = tuple(KeyNote(key=str(k), value=v, outcome="translated", effect=_effect(k, v))
                      for k, v in data.items())
        return ConfigFile(path=path, settings=validate(flat, where), notes=notes)
    translation, problems = translate_all(data)
    settings, more = _check_all(translation.settings, translation.origins)
    problems += more
    if problems:
        raise ConfigError(problems_message(where, problems))
    return ConfigFile(path=path, settings=settings, notes=translation.notes, accelerate=True)


def _effect(key: str, value: Any) -> str:
    if key == "mesh" and isinstance(value, (str, Mapping)):
        sizes = _mesh_block(value, "mesh")
        return ", ".join(f"{axis}_size={size}" for axis, size in sizes.items())
    return f"{key}={value if not isinstance(value, bool) else str(value).lower()}"


def _mesh_block(value: Any, where: str) -> dict[str, Any]:
    """The axis sizes a ``mesh:`` block names (``{tp: 2}`` or ``"tp=2"``), unchecked."""
    if isinstance(value, str):  # axes left out: 1, and dp_shard inferred (-1: left unset)
        mesh = parse_mesh(value, source=f"{where}: `mesh`")
        return {axis: size for axis, size in mesh.sizes.items() if size != -1}
    if not isinstance(value, Mapping):
        raise _bad(where, "mesh", value, "be a mapping of axis sizes or a string like "
                   "'dp_shard=2,tp=2'", fix="E.g. mesh: {dp_shard: 2, tp: 2}.")
    unknown = sorted(set(map(str, value)) - set(AXES))
    if unknown:
        raise _bad(where, "mesh", dict(value), f"name axes among {', '.join(AXES)}",
                   fix=f"Unknown axes {unknown}; e.g. mesh: {{dp_shard: 2, tp: 2}}.")
    return {str(k): v for k, v in value.items()}


def _expand_mesh(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """distlib's flat keys, with a ``mesh:`` block turned into its ``*_size`` keys."""
    if data.get("mesh") is None:
        return {k: v for k, v in data.items() if k != "mesh"}
    sizes = {f"{axis}_size": size for axis, size in _mesh_block(data["mesh"], where).items()}
    twice = sorted(k for k in sizes if k in data)
    if twice:
        raise _bad(where, "mesh", data["mesh"], f"not name an axis that {', '.join(twice)} "
                   "also sets", fix="Write the mesh once: the `mesh:` block or the *_size keys.")
    return {k: v for k, v in data.items() if k != "mesh"} | sizes


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
    return translate(data, where)


def _slurm(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """Machine count, machine rank, main address and port that a SLURM allocation implies
    (the rendezvous rule is `distlib._slurm.slurm_rendezvous`, shared with `detect()`)."""
    if "SLURM_JOB_ID" not in environ or "SLURM_NNODES" not in environ:
        return {}
    out: dict[str, tuple[Any, str]] = {"num_machines": (environ["SLURM_NNODES"].strip(),
                                                        "environment (SLURM_NNODES)")}
    if "SLURM_NODEID" in environ:
        out["machine_rank"] = (int(environ["SLURM_NODEID"]), "environment (SLURM_NODEID)")
    meet = slurm_rendezvous(environ)
    if meet.address is not None:
        out["main_address"] = (meet.address,
                               f"environment (first host of {meet.address_variable})")
    if meet.port is not None:
        out["main_port"] = (meet.port, f"environment (from {meet.port_variable})")
    return out


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
    env_values = {s.name: (environ[s.environ], f"environment ({s.environ})") for s in TABLE
                  if s.environ and environ.get(s.environ) and s.mesh_axis is None}
    env_values |= _mesh_from_environ(environ)
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
    return _flagged_count_wins(out)


def _flagged_count_wins(out: dict[str, tuple[Any, str]]) -> dict[str, tuple[Any, str]]:
    """A flag for one process count drops the other count when a lower source set it."""
    flagged = [name for name in _COUNTS if out[name][1] == "flag"]
    if len(flagged) != 1:
        return out
    other = next(name for name in _COUNTS if name != flagged[0])
    value, source = out[other]
    if value is not None:
        out[other] = (None, f"{source} said {value}; overridden by {flag_name(flagged[0])}")
    return out


def _mesh_from_environ(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """The mesh settings a ``DISTLIB_MESH`` in the launcher's environment names (an axis
    left to be inferred, ``-1``, is left unset)."""
    raw = environ.get(MESH_VARIABLE, "").strip()
    if not raw:
        return {}
    mesh = parse_mesh(raw, source=f"launch settings: {MESH_VARIABLE}")
    source = f"environment ({MESH_VARIABLE})"
    return {f"{axis}_size": (size, source) for axis, size in mesh.sizes.items() if size != -1}


def resolve_sources(flags: Mapping[str, Any], config_file: str | None,
                    environ: Mapping[str, str]) -> tuple[dict[str, tuple[Any, str]],
                                                         ConfigFile | None]:
    """Validate the flags given, read the config file (``config_file``, else the default
    one when it exists) and `resolve` every setting; also return the file read.

    Raises:
        ConfigError: a bad flag value, or any problem of the config file.

    Example:
        >>> resolved, config = resolve_sources({"num_processes": "2"}, None, {"HOME": "/nowhere"})
        >>> resolved["num_processes"], config is None
        ((2, 'flag'), True)

    Effects: reads the config file.
    """
    given = validate(flags, "command line")
    path, found = config_file, ""
    if path is None and os.path.exists(default_config_path(environ)):
        path = default_config_path(environ)
    if path is None and os.path.isfile(accelerate_config_path(environ)):
        path, found = (accelerate_config_path(environ),
                       "Accelerate's default config file (distlib has none)")
    config = dataclasses.replace(read_config(path), found=found) if path else None
    settings = config.settings if config else {}
    return resolve(given, settings, environ, config_source=f"config file {path}"), config


def _is_flag(source: str) -> bool:
    return source == "flag" or source.startswith("flag ")


def ignored_settings(resolved: Mapping[str, tuple[Any, str]]) -> dict[str, str]:
    """The options of a strategy not in use that a config file (or variable) set, and why
    they are ignored; options typed as flags are not ignored (`to_plan` refuses them).

    An option is ignored only when the strategy is chosen (``--strategy``, the file, a
    variable); with the strategy left to each rank, `to_plan` refuses it.

    Example:
        >>> r = resolve({"strategy": "ddp"}, {"strategy": "fsdp", "fsdp_cpu_offload": True}, {})
        >>> ignored_settings(r)
        {'fsdp_cpu_offload': 'strategy is ddp'}
    """
    strategy = resolved["strategy"][0]
    out: dict[str, str] = {}
    for setting in TABLE:
        value, source = resolved.get(setting.name, (None, "default"))
        if setting.strategy_option is None or value is None or strategy is None:
            continue
        if setting.strategy_option[0] != strategy and not _is_flag(source):
            out[setting.name] = f"strategy is {strategy}"
    return out


def _strategy_options(resolved: Mapping[str, tuple[Any, str]]) -> dict[str, Any]:
    strategy, strategy_source = resolved["strategy"]
    ignored = ignored_settings(resolved)
    options: dict[str, Any] = {}
    for setting in TABLE:
        key = setting.name
        value, source = resolved.get(key, (None, "default"))
        if setting.strategy_option is None or value is None or key in ignored:
            continue
        owner, option = setting.strategy_option
        if owner == strategy:
            options[option] = value
            continue
        chosen = (f"the strategy is {strategy!r} ({strategy_source})" if strategy is not None
                  else "the strategy is left to each rank")
        if _is_flag(source):
            flag = setting.flag if value is not False else "--no-" + setting.flag[2:]
            typed = flag if isinstance(value, bool) else f"{flag} {value}"
            msg = (f"command line: {flag} must only be given with --strategy {owner}, but "
                   f"got {typed} while {chosen}. Pass --strategy {owner} too, or drop {flag}.")
            raise ConfigError(msg)
        raise _bad(f"launch settings ({source})", key, value, f"only be set with strategy "
                   f"{owner!r}", fix=f"{chosen[0].upper()}{chosen[1:]}; set strategy: "
                   f"{owner} (or pass --strategy {owner}), or drop `{key}`.")
    return options


def _with_sources(message: str, resolved: Mapping[str, tuple[Any, str]]) -> str:
    """``message``, plus where the settings it names came from (a config file, a variable)."""
    given: dict[str, list[str]] = {}  # source -> its settings, as name=value
    named: dict[str, list[str]] = {}  # the same, for the settings the message names
    for name, (value, source) in resolved.items():
        if value is None or source in ("default", "derived") or _is_flag(source):
            continue
        shown = f"{name}={str(value).lower() if isinstance(value, bool) else value}"
        given.setdefault(source, []).append(shown)
        if source not in message and any(
                re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", message)
                for word in (name, flag_name(name))):
            named.setdefault(source, []).append(shown)
    if not named and not message.startswith("command line:"):  # say what each source set
        named = {source: names for source, names in given.items() if source not in message}
    if not named:
        return message
    where = "; ".join(f"{', '.join(names)} from {source}" for source, names in named.items())
    return f"{message} ({where}.)"


def to_plan(resolved: Mapping[str, tuple[Any, str]]) -> LaunchPlan:
    """Turn resolved settings into a `LaunchPlan`, rejecting impossible combinations.

    Example:
        >>> plan = to_plan(resolve({"num_processes": 2, "cpu": True}, {}, {}))
        >>> plan.nproc_per_node, plan.cpu, plan.main_port
        (2, True, 0)
    """
    try:
        return _to_plan(resolved)
    except ConfigError as error:
        raise ConfigError(_with_sources(str(error), resolved)) from None


def _to_plan(resolved: Mapping[str, tuple[Any, str]]) -> LaunchPlan:
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
    fields = {s.plan_field: v[s.name] for s in TABLE
              if s.plan_field is not None and s.mesh_axis is None}
    return plan_launch(num_processes=v["num_processes"], num_machines=v["num_machines"],
                       **fields | {"main_port": port, "mesh": _mesh(v)},
                       strategy_options=_strategy_options(resolved))


def _mesh(values: Mapping[str, Any]) -> Mesh | None:
    """The mesh the four ``*_size`` settings name (None when none is set): an axis left out
    is 1, except ``dp_shard``, which takes the ranks the others leave."""
    sizes = {s.mesh_axis: values[s.name] for s in TABLE
             if s.mesh_axis is not None and values.get(s.name) is not None}
    if not sizes:
        return None
    return Mesh(**({"dp_shard": -1} | sizes))
