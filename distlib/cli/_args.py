"""What every ``distlib`` subcommand's parser shares: underscore spellings, hidden from help.

Accelerate's and torchrun's users type ``--num_processes``; distlib's flags are
``--num-processes``. `spellings` gives argparse both as option strings of one argument, and
`Formatter` leaves the underscore ones out of ``--help``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["Formatter", "Switch", "spellings"]


def spellings(*flags: str) -> tuple[str, ...]:
    """``flags`` plus the underscore spelling of each dashed long flag, in that order.

    Example:
        >>> spellings("--num-processes", "-n")
        ('--num-processes', '-n', '--num_processes')
    """
    extra = tuple("--" + f[2:].replace("-", "_") for f in flags
                  if f.startswith("--") and "-" in f[2:])
    return flags + tuple(f for f in extra if f not in flags)


def _is_underscore_spelling(flag: str, all_flags: Sequence[str]) -> bool:
    return (flag.startswith("--") and "_" in flag[2:]
            and "--" + flag[2:].replace("_", "-") in all_flags)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, without the underscore spellings that `spellings` added."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = [f for f in action.option_strings
                 if not _is_underscore_spelling(f, action.option_strings)]
        if len(shown) == len(action.option_strings):
            return super()._format_action_invocation(action)
        copy = argparse.Action(shown, action.dest, nargs=action.nargs, metavar=action.metavar,
                               choices=action.choices, help=action.help)
        return super()._format_action_invocation(copy)


class Switch(argparse.Action):
    """A true/false flag: ``--cpu`` sets True, ``--no-cpu`` False (each in both spellings).

    argparse's ``BooleanOptionalAction`` derives its ``--no-`` flags itself, so it cannot
    give ``--no_cpu``; this action is handed every spelling by `Switch.flags`.
    """

    def __init__(self, option_strings: list[str], dest: str, default: object = None,
                 help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    @staticmethod
    def flags(flag: str) -> tuple[str, ...]:
        """``--x-y`` -> every spelling of ``--x-y`` and ``--no-x-y``.

        Example:
            >>> Switch.flags("--dry-run")
            ('--dry-run', '--no-dry-run', '--dry_run', '--no_dry_run')
        """
        return spellings(flag, "--no-" + flag[2:])

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings[:2])
