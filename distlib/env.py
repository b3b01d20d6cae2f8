"""`Env`, the immutable description of this process's place in a job, and `detect()`.

`detect()` is the only reader of launch variables in distlib. It is pure: it reads the mapping
it is given (``os.environ`` by default) and a `Hardware` value (probed through torch when not
given), and returns a frozen `Env`. Nothing here joins a process group or touches a device.

Precedence, highest first: explicit arguments of `detect()` > launch variables > the config
mapping > defaults. When several launchers' variables are present (``srun torchrun ...``) the
innermost launcher wins: distlib's own > torchrun > MPI > SLURM.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from distlib._slurm import expand_tasks_per_node, slurm_rendezvous
from distlib.errors import ConfigError, EnvError
from distlib.precision import Precision, parse_precision
from distlib.strategies.base import Strategy, parse_strategy
from distlib.strategies.single import Single
from distlib.strategies.xla import XLA
from distlib.topology import AXES, Mesh, parse_mesh

__all__ = ["BACKENDS", "DEFAULT_TIMEOUT_S", "FALSE_WORDS", "TRUE_WORDS", "Backend", "Env",
           "Hardware", "Launcher", "detect", "parse_bool", "probe_hardware"]


class Backend(str, Enum):
    """The ``torch.distributed`` backend of a job; plain strings are accepted and compare equal.

    Examples:
        >>> Backend("nccl") is Backend.NCCL, Backend.GLOO == "gloo", str(Backend.XLA)
        (True, True, 'xla')
    """

    GLOO = "gloo"
    NCCL = "nccl"
    MPI = "mpi"
    XLA = "xla"

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return f"Backend.{self.name}"


class Launcher(str, Enum):
    """Which launcher's variables `detect()` read (``none``: a plain ``python`` process).

    Examples:
        >>> Launcher("torchrun") is Launcher.TORCHRUN, Launcher.NONE == "none"
        (True, True)
    """

    NONE = "none"
    DISTLIB = "distlib"
    TORCHRUN = "torchrun"
    OPENMPI = "openmpi"
    INTELMPI = "intelmpi"
    MVAPICH = "mvapich"
    SLURM = "slurm"
    XMP = "xmp"  # a replica started by torch_xla's xmp.spawn

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return f"Launcher.{self.name}"


BACKENDS = tuple(b.value for b in Backend)
# How long the rendezvous and each collective may wait unless the launcher's `timeout`
# setting (DISTLIB_TIMEOUT in the ranks) says otherwise.
DEFAULT_TIMEOUT_S = 1800

# The one vocabulary of true/false settings: variables, config files, flags and answers.
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(value: object) -> bool | None:
    """Read a true/false setting: a bool, or one of `TRUE_WORDS` / `FALSE_WORDS` (any case).

    Every boolean distlib reads (``DISTLIB_*`` variables, config files in either format, the
    answers of ``distlib config``) goes through this one function; each caller names the input
    in its own error when this returns None.

    Returns:
        True or False, or None when ``value`` is neither a bool nor an accepted spelling.

    Examples:
        >>> parse_bool("ON"), parse_bool(" no "), parse_bool(True), parse_bool("maybe")
        (True, False, True, None)
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    return None

# What each launcher calls the fields (None: the launcher does not set it).
_TORCHRUN = {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK",
             "local_world_size": "LOCAL_WORLD_SIZE", "node_rank": "GROUP_RANK",
             "num_nodes": "GROUP_WORLD_SIZE"}
_OPENMPI = {"rank": "OMPI_COMM_WORLD_RANK", "world_size": "OMPI_COMM_WORLD_SIZE",
            "local_rank": "OMPI_COMM_WORLD_LOCAL_RANK",
            "local_world_size": "OMPI_COMM_WORLD_LOCAL_SIZE",
            "node_rank": "OMPI_COMM_WORLD_NODE_RANK", "num_nodes": None}
_INTELMPI = {"rank": "PMI_RANK", "world_size": "PMI_SIZE", "local_rank": "MPI_LOCALRANKID",
             "local_world_size": "MPI_LOCALNRANKS", "node_rank": None, "num_nodes": None}
_MVAPICH = {"rank": "MV2_COMM_WORLD_RANK", "world_size": "MV2_COMM_WORLD_SIZE",
            "local_rank": "MV2_COMM_WORLD_LOCAL_RANK",
            "local_world_size": "MV2_COMM_WORLD_LOCAL_SIZE", "node_rank": None, "num_nodes": None}
_SLURM = {"rank": "SLURM_PROCID", "world_size": "SLURM_NTASKS", "local_rank": "SLURM_LOCALID",
          "local_world_size": None, "node_rank": "SLURM_NODEID", "num_nodes": "SLURM_NNODES"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Hardware:
    """What `detect()` needs to know about the machine; tests pass a fake one.

    Examples:
        >>> Hardware(num_gpus=8).num_gpus
        8
    """

    num_gpus: int = 0
    mps: bool = False
    xla: bool = False
    # The rank fields of an ``xmp.spawn`` replica as torch_xla's runtime reports them, in the
    # order of _XLA_FIELDS (replicas may be threads of one process: not in the environment).
    xla_replica: tuple[int, int, int, int, int, int] | None = None


_XLA_FIELDS = ("rank", "world_size", "local_rank", "local_world_size", "node_rank", "num_nodes")


def probe_hardware(*, xla_replica: bool = False) -> Hardware:
    """Ask torch how many GPUs are visible and whether MPS / torch_xla exist.

    Args:
        xla_replica: this process runs ``xmp.spawn`` replicas: ask torch_xla's runtime for
            the replica's ranks (this starts the runtime, so never in the parent of
            ``xmp.spawn``).

    Effects: imports torch; does not initialise CUDA (``device_count`` uses NVML where it can).
    """
    import importlib.util

    import torch

    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    xla = importlib.util.find_spec("torch_xla") is not None
    ranks = None
    if xla and xla_replica:
        from distlib import _xla

        found = _xla.runtime_ranks()
        ranks = tuple(int(found[f]) for f in _XLA_FIELDS)
    return Hardware(num_gpus=torch.cuda.device_count(), mps=mps, xla=xla,
                    xla_replica=ranks)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class Env:
    """This process's place in a job: ranks, rendezvous address, device and policies.

    Build one with `detect()`, or directly (a test can build rank 3 of 8 without launching
    anything). Change one field with ``dataclasses.replace``. Plain strings are accepted for
    ``precision`` and ``strategy``.

    ``mesh`` factors the world into ``dp_replicate x dp_shard x cp x tp`` (default: all data
    parallel); an Env always holds it resolved (no ``-1`` size).

    Examples:
        >>> env = Env(rank=3, world_size=8, local_rank=3, local_world_size=8)
        >>> env.is_main, env.is_distributed, env.mesh.dp_size
        (False, True, 8)
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: Backend = Backend.GLOO
    device: str = "cpu"
    precision: Precision = Precision.NO
    strategy: Strategy = field(default_factory=Single)
    launcher: Launcher = Launcher.NONE
    agent_store: bool = False
    restart_count: int = 0
    timeout_s: float = float(DEFAULT_TIMEOUT_S)
    debug: bool = False
    check_collectives: bool = True
    mesh: Mesh = field(default_factory=Mesh)

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", parse_precision(self.precision, source="Env(): precision"))
        object.__setattr__(self, "strategy", parse_strategy(self.strategy, source="Env(): strategy"))
        ints = {k: getattr(self, k) for k in (*_TORCHRUN, "master_port", "restart_count")}
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int):
                msg = f"Env(): {name} must be an int, but got {value!r} ({type(value).__name__})."
                raise EnvError(msg)
        _check_ranks("Env()", ints, {k: k for k in ints}, repr)
        if self.backend not in BACKENDS:
            msg = (f"Env(): backend must be one of {', '.join(map(repr, BACKENDS))}, but got "
                   f"{self.backend!r}. Use 'nccl' on NVIDIA GPUs, 'gloo' on CPUs.")
            raise EnvError(msg)
        object.__setattr__(self, "backend", Backend(self.backend))
        if self.launcher not in tuple(Launcher):
            msg = (f"Env(): launcher must be one of {', '.join(repr(x.value) for x in Launcher)}, "
                   f"but got {self.launcher!r}. detect() sets it; leave it out when building "
                   "an Env by hand.")
            raise EnvError(msg)
        object.__setattr__(self, "launcher", Launcher(self.launcher))
        if not _is_device(self.device):
            msg = (f"Env(): device must look like 'cpu', 'cuda:0', 'mps' or 'xla:0', but got "
                   f"{self.device!r}.")
            raise EnvError(msg)
        if not self.timeout_s > 0:
            msg = f"Env(): timeout_s must be > 0 seconds, but got {self.timeout_s!r}."
            raise EnvError(msg)
        for name in ("debug", "check_collectives", "agent_store"):
            if not isinstance(getattr(self, name), bool):
                msg = (f"Env(): {name} must be True or False, but got "
                       f"{getattr(self, name)!r}.")
                raise EnvError(msg)
        if not isinstance(self.mesh, Mesh):
            msg = (f"Env(): mesh must be a distlib Mesh, but got {self.mesh!r}. Use "
                   "Mesh(dp_shard=2, tp=2) (distlib.topology), or leave it out for pure data "
                   "parallelism.")
            raise EnvError(msg)
        object.__setattr__(self, "mesh", self.mesh.resolve(self.world_size))

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """True on the first rank of each machine."""
        return self.local_rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def torch_device(self) -> Any:
        """The device as a ``torch.device`` (imports torch)."""
        import torch

        return torch.device(self.device)


def _is_device(text: object) -> bool:
    if not isinstance(text, str):
        return False
    kind, _, index = text.partition(":")
    return kind in ("cpu", "cuda", "mps", "xla", "meta") and (index == "" or index.isdigit())


def _check_ranks(call: str, v: Mapping[str, int], label: Mapping[str, str],
                 show: Callable[[Any], str], shown: Mapping[str, str] | None = None) -> None:
    """Check the rank fields; ``label`` maps each field to the name a user knows it by.

    ``shown`` overrides how a field's value is written (a field derived from another
    variable says which, e.g. ``local_world_size=2 (from SLURM_TASKS_PER_NODE='2(x2)')``).
    """
    def fail(rule: str, *names: str, fix: str) -> None:
        got = ", ".join((shown or {}).get(n) or f"{label[n]}={show(v[n])}" for n in names)
        msg = f"{call}: {rule}, but got {got}. {fix}"
        raise EnvError(msg)

    for name in v:
        if v[name] < 0:
            fail(f"{label[name]} must be >= 0", name, fix="Counts and ranks cannot be negative.")
    for name in ("world_size", "local_world_size", "num_nodes"):
        if v[name] < 1:
            fail(f"{label[name]} must be >= 1", name, fix="At least one process takes part.")
    checks = (("rank", "world_size", "Was the launcher started with a different world size?"),
              ("local_rank", "local_world_size", "Is the number of processes per machine right?"),
              ("node_rank", "num_nodes", "Is the machine rank below the number of machines?"))
    for lo, hi, fix in checks:
        if v[lo] >= v[hi]:
            fail(f"{label[lo]} must be in [0, {label[hi]})", lo, hi, fix=fix)
    if v["local_world_size"] > v["world_size"]:
        fail(f"{label['local_world_size']} must be <= {label['world_size']}",
             "local_world_size", "world_size", fix="A machine cannot hold more ranks than the job.")
    if not 1 <= v["master_port"] <= 65535:
        fail(f"{label['master_port']} must be in 1..65535", "master_port",
             fix="Pick a free TCP port, e.g. 29500.")


def _read_int(environ: Mapping[str, str], name: str) -> int:
    raw = environ[name]
    try:
        return int(raw.strip())
    except ValueError:
        msg = (f"detect(): {name} must be an integer, but got {name}={raw!r}. "
               "Is the variable set by a launcher, or edited by hand?")
        raise EnvError(msg) from None


def _read_bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None:
        return default
    value = parse_bool(raw) if raw.strip() else False  # set but empty: off
    if value is None:
        msg = (f"detect(): {name} must be one of "
               f"{', '.join(map(repr, TRUE_WORDS + FALSE_WORDS))}, but got {name}={raw!r}. "
               "Set it to 1 or 0.")
        raise EnvError(msg)
    return value


def _which_launcher(environ: Mapping[str, str]) -> tuple[Launcher, Mapping[str, str | None]]:
    """The innermost launcher whose variables are present."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        launched = environ.get("DISTLIB_LAUNCHED") == "1"
        return (Launcher.DISTLIB if launched else Launcher.TORCHRUN), _TORCHRUN
    for name, table in ((Launcher.OPENMPI, _OPENMPI), (Launcher.INTELMPI, _INTELMPI),
                        (Launcher.MVAPICH, _MVAPICH)):
        if table["rank"] in environ and table["world_size"] in environ:
            return name, table
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return Launcher.SLURM, _SLURM
    return Launcher.NONE, {}


def _read_ranks(environ: Mapping[str, str], table: Mapping[str, str | None]
                ) -> tuple[dict[str, int], dict[str, str]]:
    """The rank fields, and for each one not read from a variable, what it was derived from."""
    values = {"rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1,
              "node_rank": 0, "num_nodes": 1}
    present = {f: var for f, var in table.items() if var is not None and var in environ}
    values.update({f: _read_int(environ, var) for f, var in present.items()})
    raw = {f: f"{var}={environ[var]!r}" for f, var in present.items()}
    derived: dict[str, str] = {}
    if "world_size" in present and "local_world_size" not in present:
        values["local_world_size"] = values["world_size"]
        derived["local_world_size"] = raw["world_size"]
    if "local_rank" not in present and "world_size" in present:
        values["local_rank"] = values["rank"] % max(values["local_world_size"], 1)
        derived["local_rank"] = raw.get("rank", "rank 0")
    if "node_rank" not in present and values["local_world_size"] > 0:
        values["node_rank"] = values["rank"] // values["local_world_size"]
        derived["node_rank"] = "rank // local_world_size"
    if "num_nodes" not in present and values["local_world_size"] > 0:
        values["num_nodes"] = -(-values["world_size"] // values["local_world_size"])
        derived["num_nodes"] = "world_size / local_world_size"
    return values, derived


def _slurm_extras(environ: Mapping[str, str], values: dict[str, int],
                  derived: dict[str, str]) -> dict[str, Any]:
    """Local world size, main address and port that SLURM implies."""
    extras: dict[str, Any] = {}
    per_node = environ.get("SLURM_TASKS_PER_NODE") or environ.get("SLURM_NTASKS_PER_NODE")
    if per_node:
        var = ("SLURM_TASKS_PER_NODE" if environ.get("SLURM_TASKS_PER_NODE")
               else "SLURM_NTASKS_PER_NODE")
        counts = expand_tasks_per_node(per_node, source=var)
        values["local_world_size"] = counts[min(values["node_rank"], len(counts) - 1)]
        derived["local_world_size"] = f"{var}={per_node!r}"
    meet = slurm_rendezvous(environ)
    if meet.address is not None:
        extras["master_addr"] = meet.address
    if meet.port is not None:
        extras["master_port"] = meet.port
    return extras


def _device_for(environ: Mapping[str, str], hardware: Hardware, local_rank: int,
                cpu: bool) -> tuple[str, Backend]:
    """(device, backend) for this rank."""
    if cpu:
        return "cpu", Backend.GLOO
    if environ.get("PJRT_DEVICE") and hardware.xla:
        return "xla", Backend.XLA
    if hardware.num_gpus > 0:
        return f"cuda:{local_rank % hardware.num_gpus}", Backend.NCCL
    if hardware.mps:
        return "mps", Backend.GLOO
    return "cpu", Backend.GLOO


# The launcher's settings for the mesh axes (``--tp-size``, ``tp_size:``), by axis.
_MESH_KEYS = {f"{axis}_size": axis for axis in AXES}
_CONFIG_KEYS = ("strategy", "strategy_options", "precision", "cpu", "mesh", *_MESH_KEYS)


def _from_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Strategy, precision, cpu and mesh named by an already parsed config mapping."""
    if not config:
        return {}
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
        msg = (f"detect(): config keys must be among {', '.join(map(repr, _CONFIG_KEYS))}, "
               f"but got {unknown}. Parse config files with distlib.launcher.config first; "
               "detect() takes the resulting values.")
        raise ConfigError(msg)
    out: dict[str, Any] = {}
    if "strategy" in config:
        out["strategy"] = parse_strategy(config["strategy"], config.get("strategy_options"),
                                         source="config: strategy")
    if "precision" in config:
        out["precision"] = parse_precision(config["precision"], source="config: precision")
    if "cpu" in config:
        out["cpu"] = bool(config["cpu"])
    mesh = _mesh_from_config(config)
    if mesh is not None:
        out["mesh"] = mesh
    return out


def _mesh_from_config(config: Mapping[str, Any]) -> Mesh | None:
    """The mesh of a config mapping: ``mesh`` (a Mesh, ``"tp=2"`` or ``{tp: 2}``) or the
    launcher's four ``*_size`` keys (axes left out: dp_shard inferred, the others 1)."""
    sizes = {axis: config[key] for key, axis in _MESH_KEYS.items() if config.get(key) is not None}
    given = config.get("mesh")
    if given is not None and sizes:
        msg = (f"detect(): config must name the mesh once, but got mesh={given!r} and "
               f"{', '.join(f'{a}_size={v!r}' for a, v in sizes.items())}. Keep either the "
               "mesh or the *_size keys.")
        raise ConfigError(msg)
    if given is None and not sizes:
        return None
    return _to_mesh(given if given is not None else sizes, "config: mesh")


def _to_mesh(value: object, source: str) -> Mesh:
    """A Mesh from a Mesh, a ``"dp_shard=2,tp=2"`` string or a mapping of axis sizes."""
    if isinstance(value, Mesh):
        return value
    if isinstance(value, str):
        return parse_mesh(value, source=source)
    if isinstance(value, Mapping):
        unknown = sorted(set(map(str, value)) - set(AXES))
        if unknown:
            msg = (f"{source} must map axes among {', '.join(AXES)} to sizes, but got "
                   f"{unknown} in {dict(value)!r}. E.g. {{dp_shard: 2, tp: 2}}.")
            raise ConfigError(msg)
        sizes = {str(k): v for k, v in value.items()}
        sizes.setdefault("dp_shard", -1 if all(v != -1 for v in sizes.values()) else 1)
        try:
            return Mesh(**sizes)
        except ConfigError as error:
            msg = f"{source}: {error}"
            raise ConfigError(msg) from None
    msg = (f"{source} must be a Mesh, a string like 'dp_shard=2,tp=2' or a mapping of axis "
           f"sizes, but got {value!r} ({type(value).__name__}).")
    raise ConfigError(msg)


def _choose_mesh(environ: Mapping[str, str], explicit: Mesh | str | None,
                 from_config: Mapping[str, Any], world_size: int) -> Mesh:
    """Explicit > DISTLIB_MESH > config > all data parallel; resolved for ``world_size``."""
    raw = environ.get("DISTLIB_MESH", "").strip()
    if explicit is not None:
        mesh, shown = _to_mesh(explicit, "detect(): mesh"), f"mesh={explicit!r}"
    elif raw:
        try:
            mesh = parse_mesh(raw, source="detect(): DISTLIB_MESH")
        except ConfigError as error:
            text = str(error)
            if not text.startswith("detect(): DISTLIB_MESH"):
                text = (f"detect(): DISTLIB_MESH must hold valid axis sizes, but got "
                        f"DISTLIB_MESH={environ['DISTLIB_MESH']!r} ({text})")
            raise EnvError(text) from None
        shown = f"DISTLIB_MESH={environ['DISTLIB_MESH']!r}"
    elif "mesh" in from_config:
        mesh, shown = from_config["mesh"], f"the config's mesh {from_config['mesh']}"
    else:
        return Mesh().resolve(world_size)
    try:
        return mesh.resolve(world_size)
    except ConfigError:
        msg = (f"detect(): the mesh's axis sizes must multiply to the world size (or divide "
               f"it, with one size -1 inferred), but got {shown} ({mesh}) for world size "
               f"{world_size}. Launch {world_size} processes for this mesh, or change the "
               "sizes (distlib launch --dp-replicate-size/--dp-shard-size/--cp-size/--tp-size).")
        error_type = EnvError if shown.startswith("DISTLIB_MESH") else ConfigError
        raise error_type(msg) from None


def _strategy_from_environ(environ: Mapping[str, str]) -> Strategy | None:
    name = environ.get("DISTLIB_STRATEGY")
    if not name:
        return None
    raw = environ.get("DISTLIB_STRATEGY_OPTIONS", "") or "{}"
    try:
        options = json.loads(raw)
    except json.JSONDecodeError:
        options = None
    if not isinstance(options, dict):
        msg = (f"detect(): DISTLIB_STRATEGY_OPTIONS must be a JSON object, but got "
               f"DISTLIB_STRATEGY_OPTIONS={raw!r}. It is written by `distlib launch`; "
               "set it to e.g. '{\"zero_stage\": 3}'.")
        raise EnvError(msg)
    parse_strategy(name, None, source="detect(): DISTLIB_STRATEGY")  # a known name first
    try:
        return parse_strategy(name, options, source="options")
    except ConfigError as error:
        msg = (f"detect(): DISTLIB_STRATEGY_OPTIONS must hold valid options of strategy "
               f"DISTLIB_STRATEGY={name!r}, but got DISTLIB_STRATEGY_OPTIONS={raw!r} ({error}). It is "
               "written by `distlib launch` from its strategy flags; set them there.")
        raise ConfigError(msg) from None


def detect(
    environ: Mapping[str, str] | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    precision: Precision | str | None = None,
    strategy: Strategy | str | None = None,
    cpu: bool | None = None,
    hardware: Hardware | None = None,
    mesh: Mesh | str | None = None,
) -> Env:
    """Read the launch variables and return this process's `Env`.

    Args:
        environ: the variables to read (default ``os.environ``); nothing else is read.
        config: parsed config values (``strategy``, ``strategy_options``, ``precision``,
            ``cpu``) that the variables override.
        precision: overrides every other source.
        strategy: overrides every other source.
        cpu: True forces the CPU; False or None leave the choice to ``DISTLIB_CPU`` (the
            launcher's ``--cpu``), the config file and the hardware, as Accelerate's
            ``cpu=False`` does.
        hardware: the machine as a `Hardware` value; None probes it with torch.
        mesh: the mesh (a `Mesh` or ``"dp_shard=2,tp=2"``); overrides ``DISTLIB_MESH`` (the
            launcher's ``--tp-size`` etc.) and the config's ``mesh``. Default: all data
            parallel.

    Returns:
        A frozen `Env`.

    Raises:
        EnvError: a variable is malformed or the variables contradict each other (a
            ``DISTLIB_MESH`` whose sizes do not multiply to the world size); the message
            names the variable and quotes its value.
        ConfigError: a ``config`` key or the ``mesh`` argument is malformed.

    Examples:
        >>> env = detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
        ...               "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"},
        ...              hardware=Hardware(num_gpus=2))
        >>> env.rank, env.device, env.backend, env.strategy
        (1, 'cuda:1', Backend.NCCL, DDP(...))
    """
    environ = os.environ if environ is None else environ
    launcher, table = _which_launcher(environ)
    values, extras = _read_place(environ, launcher, table)
    from_config = _from_config(config)
    # Only True forces: False means "not forced" (Accelerate's cpu=False), so a launcher's
    # --cpu (DISTLIB_CPU) or a config file's cpu still holds.
    use_cpu = cpu is True or _read_bool(environ, "DISTLIB_CPU", from_config.get("cpu", False))
    in_xmp = _is_xmp_replica(environ, launcher, use_cpu)
    hw = hardware if hardware is not None or use_cpu else probe_hardware(xla_replica=in_xmp)
    if in_xmp and hw is not None and hw.xla_replica is not None:
        values, launcher = _xmp_ranks(hw.xla_replica, extras.get("master_port", 29500))
    device, backend = _device_for(environ, hw or Hardware(), values["local_rank"], use_cpu)
    chosen_mesh = _choose_mesh(environ, mesh, from_config, values["world_size"])
    return Env(
        **values, **extras, **_read_policies(environ), backend=backend, device=device,
        launcher=launcher,
        precision=_choose_precision(environ, precision, from_config),
        strategy=_choose_strategy(environ, strategy, from_config, backend, values["world_size"],
                                  chosen_mesh),
        mesh=chosen_mesh,
    )


def _read_place(environ: Mapping[str, str], launcher: Launcher,
                table: Mapping[str, str | None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rank fields, and the main address and port, checked together."""
    values, derived = _read_ranks(environ, table)
    implied = (_slurm_extras(environ, values, derived) if launcher == Launcher.SLURM else {})
    labels = {f: (table.get(f) or f) for f in _TORCHRUN} | {"master_port": "MASTER_PORT"}
    return dict(values), _read_address(environ, values, labels, derived, implied)


def _is_xmp_replica(environ: Mapping[str, str], launcher: Launcher, use_cpu: bool) -> bool:
    """An ``xmp.spawn`` replica: no launcher variables, PJRT_LOCAL_PROCESS_COUNT set by it."""
    return (launcher == Launcher.NONE and bool(environ.get("PJRT_DEVICE"))
            and "PJRT_LOCAL_PROCESS_COUNT" in environ and not use_cpu)


def _xmp_ranks(replica: tuple[int, ...], port: int) -> tuple[dict[str, Any], Launcher]:
    """The rank fields torch_xla's runtime reported for this replica, checked."""
    values: dict[str, Any] = dict(zip(_XLA_FIELDS, replica, strict=True))
    _check_ranks("detect()", values | {"master_port": port},
                 {f: f"torch_xla's {f}" for f in values} | {"master_port": "MASTER_PORT"}, repr)
    return values, Launcher.XMP


def _choose_strategy(environ: Mapping[str, str], explicit: Strategy | str | None,
                     from_config: Mapping[str, Any], backend: Backend,
                     world_size: int, mesh: Mesh) -> Strategy:
    """Explicit > DISTLIB_STRATEGY > config > XLA device > FSDP for a tp/cp mesh > DDP for
    several ranks > Single (tensor and context parallelism compose with FSDP2, not DDP)."""
    chosen = (explicit if explicit is not None
              else _strategy_from_environ(environ) or from_config.get("strategy"))
    if chosen is None and backend == Backend.XLA:
        chosen = XLA(spmd=_read_bool(environ, "XLA_USE_SPMD", False))
    elif chosen is None and not mesh.is_data_parallel_only:
        chosen = "fsdp"
    elif chosen is None:
        chosen = "ddp" if world_size > 1 else "single"
    return parse_strategy(chosen, source="strategy")


def _choose_precision(environ: Mapping[str, str], explicit: Precision | str | None,
                      from_config: Mapping[str, Any]) -> Precision:
    """Explicit > DISTLIB_PRECISION > config > "no"."""
    if explicit is not None:
        return parse_precision(explicit, source="precision")
    if environ.get("DISTLIB_PRECISION"):
        return parse_precision(environ["DISTLIB_PRECISION"], source="detect(): DISTLIB_PRECISION")
    return parse_precision(from_config.get("precision"), source="precision")


def _read_address(environ: Mapping[str, str], values: Mapping[str, int],
                  labels: Mapping[str, str], derived: Mapping[str, str],
                  implied: Mapping[str, Any]) -> dict[str, Any]:
    """Read MASTER_ADDR / MASTER_PORT over what SLURM ``implied``; check the rank fields."""
    extras = dict(implied)
    if "MASTER_PORT" in environ:
        extras["master_port"] = _read_int(environ, "MASTER_PORT")
    if "MASTER_ADDR" in environ:
        extras["master_addr"] = environ["MASTER_ADDR"].strip()
        if not extras["master_addr"]:
            if values["world_size"] > 1:
                msg = (f"detect(): MASTER_ADDR must name the host of rank 0, but got "
                       f"MASTER_ADDR={environ['MASTER_ADDR']!r}. Export MASTER_ADDR=<host of "
                       "rank 0>, or unset it for a job on this machine (127.0.0.1).")
                raise EnvError(msg)
            del extras["master_addr"]  # one process: nothing connects to it
    shown = {f: (f"{labels[f]} unset, so {values[f]} (from {how})" if labels[f] != f
                 else f"{f}={values[f]} (from {how})") for f, how in derived.items()}
    _check_ranks("detect()", {**values, "master_port": extras.get("master_port", 29500)},
                 labels, lambda x: repr(str(x)), shown)
    if values["num_nodes"] > 1 and "master_addr" not in extras:
        var = labels["num_nodes"]
        machines = shown.get("num_nodes") or f"{var}={environ.get(var, values['num_nodes'])!r}"
        msg = (f"detect(): MASTER_ADDR must be set when the job spans machines, but got "
               f"{machines} and no MASTER_ADDR. Export MASTER_ADDR=<host of rank 0> before "
               "launching.")
        raise EnvError(msg)
    return extras


def _read_policies(environ: Mapping[str, str]) -> dict[str, Any]:
    """The Env fields the launcher passes as DISTLIB_* / TORCHELASTIC_* variables."""
    restarts = 0
    if "TORCHELASTIC_RESTART_COUNT" in environ:
        restarts = _read_int(environ, "TORCHELASTIC_RESTART_COUNT")
        if restarts < 0:
            msg = (f"detect(): TORCHELASTIC_RESTART_COUNT must be >= 0, but got "
                   f"TORCHELASTIC_RESTART_COUNT={environ['TORCHELASTIC_RESTART_COUNT']!r}. "
                   "It is set by torch's elastic agent; unset it outside a launched job.")
            raise EnvError(msg)
    timeout = float(DEFAULT_TIMEOUT_S)
    if environ.get("DISTLIB_TIMEOUT", "").strip():
        raw = environ["DISTLIB_TIMEOUT"]
        try:
            timeout = float(raw.strip())
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and timeout > 0):
            msg = (f"detect(): DISTLIB_TIMEOUT must be a number of seconds > 0, but got "
                   f"DISTLIB_TIMEOUT={raw!r}. Set it to e.g. 1800 (distlib launch --timeout).")
            raise EnvError(msg)
    return {"restart_count": restarts, "timeout_s": timeout,
            "agent_store": _read_bool(environ, "TORCHELASTIC_USE_AGENT_STORE", False),
            "debug": _read_bool(environ, "DISTLIB_DEBUG", False),
            "check_collectives": _read_bool(environ, "DISTLIB_CHECK_COLLECTIVES", True)}
