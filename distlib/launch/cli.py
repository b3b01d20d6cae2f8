"""The ``distlib`` command: a thin argparse front over the library.

Each subcommand lives in its own module, imported only when that subcommand runs, so
``distlib --help`` answers without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("distlib.launch.env_report", "print versions, devices, the detected Env and config"),
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="distlib",
        description="Configure, test and launch PyTorch jobs on any hardware.",
        epilog=f"commands:\n{lines}\n\nRun 'distlib COMMAND --help' for a command's options.",
        formatter_class=_Formatter,
    )
    from distlib import __version__

    parser.add_argument("--version", action="version", version=f"distlib {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    return parser


def _normalise(argv: Sequence[str]) -> list[str]:
    """Accept ``--foo_bar`` as ``--foo-bar`` (up to the script or ``--``)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--" or (not arg.startswith("-") and arg.endswith(".py")):
            return out + list(argv[i:])
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            flag, eq, value = arg.partition("=")
            arg = flag.replace("_", "-") + eq + value
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``distlib`` command line and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv or ["--help"])
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        top.parse_args([command])
        return 2
    module_name, text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"distlib {command}", description=text)
    module.add_arguments(parser)
    args = parser.parse_args(_normalise(rest))
    return int(module.run(args))
