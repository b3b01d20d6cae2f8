"""Every option of every ``distlib`` subcommand has help and a placeholder a user can read
(``N``, ``PATH``, ``SECONDS``... never argparse's ``NUM_PROCESSES``); the launcher settings
show their defaults in ``--help``; every subcommand's ``--help`` answers without importing
torch."""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys

import pytest

from distlib.cli import COMMANDS
from distlib.cli._args import Formatter, Parser
from distlib.launcher.settings import SETTINGS

# The placeholders help may show besides a list of choices ({no,fp16,...}).
PLACEHOLDERS = {"N", "PATH", "SECONDS", "ADDR", "PORT", "HOST:PORT", "ID", "LIST", "NAMES",
                "NAME", "NORM", "SIZE", "JSON", "CLASS", "AXIS=SIZE,...", "KEY=VALUE,...",
                "MODULE:FUNCTION", "DEVICE=SIZE,..."}

# Subcommands whose parsers other modules own and that still show argparse's placeholders;
# strict: once fixed, the xfail fails and the entry must go.
NOT_YET: dict[str, str] = {}  # commands whose parsers still break the rule (none)

# Subcommands whose --help still imports torch through a module this test does not own;
# strict as above: once torch-free, the xfail fails and the entry must go.
TORCH_IN_HELP: dict[str, str] = {}  # (none)

# One child per subcommand (a fresh interpreter: torch imported by one --help cannot hide
# another's): the help goes to stdout, then whether torch was imported.
_HELP_IMPORTS = """\
import sys
from distlib.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("TORCH", "torch" in sys.modules)
"""


def _parsers(command: str) -> list[tuple[str, argparse.ArgumentParser]]:
    parser = Parser(prog=f"distlib {command}", formatter_class=Formatter)
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    found = [(f"distlib {command}", parser)]
    for action in parser._actions:  # nested subcommands, if a command grows some
        if isinstance(action, argparse._SubParsersAction):
            found += [(f"distlib {command} {name}", sub) for name, sub in action.choices.items()]
    return found


def _problems(prog: str, parser: argparse.ArgumentParser) -> list[str]:
    problems = []
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        if not action.help or action.help == argparse.SUPPRESS:
            problems.append(f"{prog} {name}: no help")
        if not action.option_strings or action.nargs == 0 or action.choices:
            continue
        shown = action.metavar or action.dest.upper()
        if shown not in PLACEHOLDERS:
            problems.append(f"{prog} {name}: placeholder {shown!r}")
    return problems


@pytest.mark.parametrize("command", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=NOT_YET[c])) if c in NOT_YET
    else c for c in COMMANDS])
def test_every_option_has_help_and_a_readable_placeholder(command: str) -> None:
    problems = [p for prog, parser in _parsers(command) for p in _problems(prog, parser)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("command", ["launch", "test"])
def test_every_launcher_setting_shows_its_default(command: str) -> None:
    (_, parser), = _parsers(command)
    for action in parser._actions:
        if action.dest in SETTINGS:
            assert "default" in str(action.help), action.option_strings


def test_launch_help_reads_as_a_user_meets_it() -> None:
    out = subprocess.run([sys.executable, "-m", "distlib", "launch", "--help"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    flat = " ".join(out.split())
    for shown in ("--num-processes N", "--nproc-per-node N", "--main-address ADDR",
                  "--main-port PORT", "--timeout SECONDS", "--rdzv-id ID",
                  "(default: 127.0.0.1); also --main_process_ip, --master-addr",
                  "(default: no); also --mixed_precision", "--zero-stage {0,1,2,3} ZeRO stage "
                  "(default: 2)", "--cpu, --no-cpu run on CPUs even when GPUs are present "
                  "(default: off)", "--use_fsdp Accelerate's: the same as --strategy fsdp",
                  "--standalone torchrun's"):
        assert shown in flat, shown
    assert "the same as --main-address HOST --main-port PORT" in flat
    assert not re.search(r"-\n +[a-z]", out), "a help line breaks inside a flag"
    for argparse_word in ("PROCESSES", "NODE ", "MACHINES", "ADDRESS", "--num_processes",
                          "--master_addr"):
        assert argparse_word not in out, argparse_word


@pytest.mark.parametrize("argv", [
    pytest.param(a, marks=pytest.mark.xfail(strict=True, reason=TORCH_IN_HELP[a[0]]))
    if a[0] in TORCH_IN_HELP else a
    for a in [["--help"], *([c, "--help"] for c in COMMANDS), ["config", "default", "--help"]]],
    ids=" ".join)
def test_every_help_answers_without_importing_torch(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", _HELP_IMPORTS.format(argv=argv)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.startswith("usage: distlib"), done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("TORCH False"), f"{' '.join(argv)} imported torch"


def test_the_plan_optimizer_choices_are_the_planners() -> None:
    # distlib plan names its --optimizer choices itself (its --help must not import torch)
    from distlib.cli.plan import OPTIMIZER_NAMES
    from distlib.training.plan import OPTIMIZERS

    assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES
