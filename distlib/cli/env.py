"""``distlib env``: what a bug report needs, in one block of text."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

from distlib import __version__
from distlib.cli._args import spellings
from distlib.env import detect, probe_hardware
from distlib.launcher.config import default_config_path

__all__ = ["add_arguments", "environment_report", "run"]

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
    lines += [
        f"gpus         {hardware.num_gpus} {names if names else ''}".rstrip(),
        f"mps          {hardware.mps}",
        f"cpu cores    {os.cpu_count()}",
        f"env          {detect(hardware=hardware)!r}",
    ]
    path = _config_path(config_file)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            body = handle.read().rstrip()
        lines.append(f"config file  {path}\n" + "\n".join("  " + ln for ln in body.splitlines()))
    else:
        lines.append(f"config file  {path} (none)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the report."""
    print(environment_report(args.config_file))
    return 0
