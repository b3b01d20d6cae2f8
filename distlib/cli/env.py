"""``distlib env``: what a bug report needs, in one block of text."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

from distlib import __version__
from distlib.cli._args import spellings
from distlib.env import Env, detect, probe_hardware
from distlib.launcher.config import default_config_path

__all__ = ["add_arguments", "environment_report", "mesh_line", "run"]

_OPTIONAL = ("deepspeed", "torch_xla", "transformers", "safetensors", "accelerate", "numpy")
_DISTRIBUTIONS = {"torch_xla": "torch-xla"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's options."""
    parser.add_argument(*spellings("--config-file"), default=None,
                        help="config file to report (default: $DISTLIB_CONFIG_FILE or the cache)")


def _version(module: str) -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTIONS.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _config_path(explicit: str | None) -> str:
    if explicit:
        return explicit
    return default_config_path(os.environ)


def environment_report(config_file: str | None = None) -> str:
    """Return the report as text (versions, devices, detected Env, config file).

    Effects: imports torch to ask about devices; reads the config file if it exists.
    """
    import torch

    hardware = probe_hardware()
    lines = [
        f"distlib      {__version__}",
        f"python       {sys.version.split()[0]} ({platform.platform()})",
        f"torch        {torch.__version__} (cuda {torch.version.cuda or 'none'})",
    ]
    lines += [f"{name:<12} {_version(name)}" for name in _OPTIONAL]
    names = [torch.cuda.get_device_name(i) for i in range(hardware.num_gpus)]
    env = detect(hardware=hardware)
    lines += [
        f"gpus         {hardware.num_gpus} {names if names else ''}".rstrip(),
        f"mps          {hardware.mps}",
        f"cpu cores    {os.cpu_count()}",
        f"env          {env!r}",
        f"mesh         {mesh_line(env)}",
    ]
    path = _config_path(config_file)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            body = handle.read().rstrip()
        lines.append(f"config file  {path}\n" + "\n".join("  " + ln for ln in body.splitlines()))
    else:
        lines.append(f"config file  {path} (none)")
    return "\n".join(lines)


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


def run(args: argparse.Namespace) -> int:
    """Print the report."""
    print(environment_report(args.config_file))
    return 0
