"""``distlib env``: what a bug report needs, in one block to paste into a GitHub issue.

Like ``accelerate env``: versions (distlib, Python, platform, torch and its CUDA, the optional
libraries), the machine (RAM, CPU cores and this process's share, GPUs with their memory),
the launch variables set, the `Env` that `detect()` returns here (one field a line) with this
rank's place in the mesh, and the config file with its content. The report never stops at a
broken environment: what cannot be read is said in its line.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping
from typing import Any

from distlib import __version__
from distlib.cli._args import spellings
from distlib.env import Env, Hardware, detect, probe_hardware
from distlib.errors import ConfigError, DistlibError
from distlib.launcher.config import default_config_path

__all__ = ["HEADER", "add_arguments", "env_lines", "environment_report", "mesh_line", "run"]

# The report's first line (as ``accelerate env`` starts its own).
HEADER = "Copy-and-paste the text below in your GitHub issue"

_OPTIONAL = ("deepspeed", "torch_xla", "transformers", "safetensors", "accelerate", "numpy",
             "psutil", "cloudpickle")
_DISTRIBUTIONS = {"torch_xla": "torch-xla"}

# Where this distlib is imported from (an editable install, or site-packages).
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The launch variables worth showing (besides every DISTLIB_* one): what detect() reads.
_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
              "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "CUDA_VISIBLE_DEVICES",
              "OMP_NUM_THREADS", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK",
              "PMI_SIZE", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NODELIST",
              "SLURM_JOB_NODELIST", "PJRT_DEVICE")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's options."""
    parser.add_argument(*spellings("--config-file"), default=None, metavar="PATH",
                        help="the config file to report (default: $DISTLIB_CONFIG_FILE, else "
                             "~/.cache/distlib/default_config.yaml)")


def _version(module: str) -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTIONS.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB"


def _value(value: Any) -> str:
    return str(value.value) if isinstance(value, enum.Enum) else (
        value if isinstance(value, str) else repr(value))


def env_lines(env: Env) -> list[str]:
    """The Env one field a line, as the report shows it (enums by their value).

    Example:
        >>> env_lines(Env(rank=1, world_size=2, local_rank=1, local_world_size=2))[:2]
        ['  rank: 1', '  world_size: 2']
        >>> [line for line in env_lines(Env()) if "backend" in line or "strategy" in line]
        ['  backend: gloo', '  strategy: Single()']
    """
    return [f"  {f.name}: {_value(getattr(env, f.name))}" for f in dataclasses.fields(env)]


def mesh_line(env: Env) -> str:
    """The Env's mesh, and where this rank sits in it (which batches it reads).

    Example:
        >>> from distlib.topology import Mesh
        >>> mesh_line(Env(rank=3, world_size=4, local_rank=3, local_world_size=4,
        ...               mesh=Mesh(dp_shard=2, tp=2)))
        'dp_shard=2 x tp=2; rank 3 at dp_replicate=0 dp_shard=1 cp=0 tp=1, data-parallel rank 1 of 2'
    """
    place = " ".join(f"{axis}={index}" for axis, index in env.mesh.coordinates(env.rank).items())
    return (f"{env.mesh}; rank {env.rank} at {place}, data-parallel rank "
            f"{env.mesh.dp_rank(env.rank)} of {env.mesh.dp_size}")


def _versions(torch: Any) -> list[str]:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines = [f"- distlib version: {__version__} ({_PACKAGE})",
             f"- Python version: {sys.version.split()[0]} ({sys.executable})",
             f"- Platform: {platform.platform()}",
             f"- PyTorch version: {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
             f"cuDNN {cudnn or 'none'})",
             "- Optional libraries:"]
    return lines + [f"  {name}: {_version(name)}" for name in _OPTIONAL]


def _machine(torch: Any, hardware: Hardware) -> list[str]:
    import psutil

    memory = psutil.virtual_memory()
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    lines = [f"- RAM: {_gib(memory.total)} total, {_gib(memory.available)} available",
             f"- CPU cores: {cores} ({usable} usable by this process)",
             f"- GPUs: {hardware.num_gpus or 'none'}"]
    for index in range(hardware.num_gpus):
        props = torch.cuda.get_device_properties(index)
        lines.append(f"  cuda:{index}: {props.name}, {_gib(props.total_memory)}")
    lines.append(f"- MPS: {'available' if hardware.mps else 'no'}; torch_xla: "
                 f"{'installed' if hardware.xla else 'no'}")
    return lines


def _variables(environ: Mapping[str, str]) -> list[str]:
    names = [n for n in sorted(environ) if n.startswith("DISTLIB_")]
    names += [n for n in _VARIABLES if n in environ]
    return ["- Launch variables:" + ("" if names else " none")] + [
        f"  {name}={environ[name]}" for name in names]


def _config(explicit: str | None, environ: Mapping[str, str]) -> list[str]:
    try:
        path = explicit or default_config_path(environ)
    except ConfigError as error:
        return [f"- Config file: {str(error).removeprefix('config file: ')}"]
    if not os.path.isfile(path):
        return [f"- Config file: {path} (none)"]
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            body = handle.read().rstrip()
    except OSError as error:
        return [f"- Config file: {path} (unreadable: {error.strerror})"]
    return [f"- Config file: {os.path.abspath(path)}"] + [
        "  " + line for line in body.splitlines()]


def environment_report(config_file: str | None = None,
                       environ: Mapping[str, str] | None = None) -> str:
    """Return the report as text: versions, machine, launch variables, Env, config file.

    Args:
        config_file: the config file to show (default: the one ``distlib launch`` reads).
        environ: the variables to read (default ``os.environ``).

    Raises:
        ConfigError: ``config_file`` is given but names no file.

    Effects: imports torch, and asks CUDA for each GPU's name and memory; reads the config
    file.
    """
    import torch

    environ = os.environ if environ is None else environ
    if config_file is not None and not os.path.isfile(config_file):
        msg = (f"distlib env: --config-file must name an existing file, but got "
               f"{config_file!r}. Leave it out to report the default config file.")
        raise ConfigError(msg)
    hardware = probe_hardware()
    lines = [HEADER, "", *_versions(torch), *_machine(torch, hardware), *_variables(environ)]
    try:
        env = detect(environ, hardware=hardware)
    except DistlibError as error:
        lines.append(f"- Env (detect()): cannot be built: {error}")
    else:
        lines += ["- Env (detect()):", *env_lines(env), f"- Mesh: {mesh_line(env)}"]
    lines += _config(config_file, environ)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the report."""
    print(environment_report(args.config_file))
    return 0
