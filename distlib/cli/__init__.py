"""The ``distlib`` command: a thin argparse front over the library.

Each subcommand lives in its own module of this package (``distlib.cli.launch``, ...), with
``add_arguments(parser)`` and ``run(args) -> int``, imported only when that subcommand runs,
so ``distlib --help`` answers without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from distlib.cli._args import Formatter, spellings
from distlib.errors import DistlibError

__all__ = ["main"]

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("distlib.cli.env", "print versions, devices, the detected Env and config"),
    "plan": ("distlib.cli.plan", "plan a device map from a checkpoint's headers, or a parallel mesh (--mesh)"),
    "launch": ("distlib.cli.launch", "run a script or module in N ranks (any setup)"),
    "config": ("distlib.cli.config", "write the launch config (questions or defaults)"),
    "test": ("distlib.cli.test", "launch a self-test under the config and report it"),
    "merge-weights": ("distlib.cli.merge_weights", "turn a save_state checkpoint into safetensors weights"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="distlib",
        description="Configure, test and launch PyTorch jobs on any hardware.",
        epilog=f"commands:\n{lines}\n\nRun 'distlib COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from distlib import __version__

    parser.add_argument("--version", action="version", version=f"distlib {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    return parser


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
    if command == "launch" and not {"-h", "--help", *spellings("--dry-run")} & set(rest):
        import os

        from distlib.launcher._start import start_agent  # torch-free; the agent imports torch

        # Start torch's agent before anything else: it imports torch meanwhile.
        launch_agent = start_agent(os.environ)
        try:
            return _run(command, text, rest, module_name, agent=launch_agent)
        finally:
            launch_agent.release()
    return _run(command, text, rest, module_name)


def _run(command: str, text: str, rest: list[str], module_name: str,
         agent: object = None) -> int:
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"distlib {command}", description=text,
                                     formatter_class=Formatter)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    if agent is not None:
        args.agent = agent
    try:
        return int(module.run(args))
    except DistlibError as error:
        print(f"distlib {command}: error: {error}", file=sys.stderr)
        return 2
