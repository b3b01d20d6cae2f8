"""The ``distlib`` command: a thin argparse front over the library.

Each subcommand lives in its own module of this package (``distlib.cli.launch``, ...), with
``add_arguments(parser)`` and ``run(args) -> int``, imported only when that subcommand runs,
so ``distlib --help`` answers without importing torch.

Two rules hold for every subcommand. An error is one line on stderr, prefixed once with
``distlib COMMAND: error:`` (a message that already starts with the command's name has that
name dropped, so it is never said twice). A reader that stops early (``distlib plan ... |
head``) ends the command quietly with exit status 141, as ``git log | head`` does.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from distlib.cli._args import Formatter, Parser, spellings
from distlib.errors import DistlibError

__all__ = ["error_line", "main"]

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("distlib.cli.env", "print versions, devices, the detected Env and config"),
    "plan": ("distlib.cli.plan", "plan a device map from a checkpoint's headers, or a parallel mesh (--mesh)"),
    "estimate-memory": ("distlib.cli.estimate_memory", "memory per rank to train a model: each dtype and strategy, from shapes only"),
    "launch": ("distlib.cli.launch", "run a script or module in N ranks (any setup)"),
    "config": ("distlib.cli.config", "write the launch config (questions or defaults)"),
    "test": ("distlib.cli.test", "launch a self-test under the config and report it"),
    "merge-weights": ("distlib.cli.merge_weights", "turn a save_state checkpoint into safetensors weights"),
}

# What a shell reports for a command that a closed pipe stopped (128 + SIGPIPE), as for git.
BROKEN_PIPE_EXIT = 141


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
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND",
                        help="one of the commands below")
    return parser


def _command_parser(command: str, text: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (its module adds the options)."""
    return Parser(prog=f"distlib {command}", description=text, formatter_class=Formatter)


def error_line(command: str, error: BaseException | str) -> str:
    """The one line ``distlib COMMAND`` prints for an error: its prefix said once.

    Examples:
        >>> error_line("config", "distlib config: the file must not exist yet, but got 'a'.")
        "distlib config: error: the file must not exist yet, but got 'a'."
        >>> error_line("plan", "distlib plan --mesh must be given --model-config.")
        'distlib plan: error: --mesh must be given --model-config.'
        >>> error_line("env", "config file: DISTLIB_CONFIG_FILE must name a file.")
        'distlib env: error: config file: DISTLIB_CONFIG_FILE must name a file.'
    """
    text = str(error)
    for name in sorted(COMMANDS, key=len, reverse=True):
        for own in (f"distlib {name}: ", f"distlib {name} "):
            if text.startswith(own):
                text = text[len(own):]
                break
        else:
            continue
        break
    return f"distlib {command}: error: {text}"


def _quiet_stdout() -> None:
    """After the reader of stdout went away: point stdout at /dev/null, so that the flush
    at exit does not print a second BrokenPipeError.

    Effects: replaces this process's file descriptor 1 (the ``distlib`` process only).
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a file (a test's capture)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``distlib`` command line and return its exit code.

    Bare ``distlib`` prints the help on stderr and returns 2 (a usage error); ``distlib
    --help`` prints it on stdout and exits 0. A closed stdout (``| head``) returns 141
    without a traceback.
    """
    try:
        try:
            return _dispatch(list(sys.argv[1:] if argv is None else argv))
        finally:
            sys.stdout.flush()  # here, where a closed pipe can still be handled
    except BrokenPipeError:
        _quiet_stdout()
        return BROKEN_PIPE_EXIT


def _dispatch(argv: list[str]) -> int:
    top = _top_parser()
    if not argv:
        top.print_help(sys.stderr)
        return 2
    if argv[0].startswith("-"):
        top.parse_args(argv)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        top.parse_args([command])
        return 2
    module_name, text = COMMANDS[command]
    if command == "launch" and not {"-h", "--help", *spellings("--dry-run")} & set(rest):
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
    parser = _command_parser(command, text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    if agent is not None:
        args.agent = agent
    try:
        return int(module.run(args))
    except DistlibError as error:
        print(error_line(command, error), file=sys.stderr)
        return 2
