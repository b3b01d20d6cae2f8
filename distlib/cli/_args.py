"""What every ``distlib`` subcommand's parser shares: underscore spellings, hidden from help,
and "did you mean" for a misspelled option.

Accelerate's and torchrun's users type ``--num_processes``; distlib's flags are
``--num-processes``. `spellings` gives argparse both as option strings of one argument, and
`Formatter` leaves the underscore ones (and an argument's ``shown`` subset, where it sets
one) out of ``--help``. `Parser` replaces argparse's "unrecognized arguments" with one line
that names the option and the closest known one.
"""

from __future__ import annotations

import argparse
import difflib
import re
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn, cast

__all__ = ["Formatter", "Parser", "Switch", "closest_option", "spellings"]


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
    """argparse's formatter, without the underscore spellings that `spellings` added (or,
    for an argument with a ``shown`` attribute, with only those option strings), and with
    help lines that never break inside a flag."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        """argparse's wrapping, without breaking a flag at its dashes (``--main-`` / ``port``)."""
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = list(getattr(action, "shown", None) or (
            f for f in action.option_strings
            if not _is_underscore_spelling(f, action.option_strings)))
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


def closest_option(parser: argparse.ArgumentParser, typed: str) -> str | None:
    """The parser's option nearest to ``typed`` (dashes and underscores alike), or None.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = p.add_argument(*spellings("--num-processes"))
        >>> closest_option(p, "--num_proceses=2")
        '--num-processes'
    """
    name = typed.split("=", 1)[0]
    if not name.startswith("--"):
        return None
    known: dict[str, str] = {}  # dashed form -> the spelling to suggest (dashed first)
    for flag in parser._option_string_actions:
        if flag.startswith("--") and (flag.replace("_", "-") not in known or "_" not in flag):
            known[flag.replace("_", "-")] = flag
    near = difflib.get_close_matches(name.replace("_", "-"), list(known), n=1, cutoff=0.75)
    return known[near[0]] if near else None


class Parser(argparse.ArgumentParser):
    """argparse's parser, where an unknown option is one line with a "did you mean".

    ``distlib launch --num-proceses 2 x.py`` ends (exit status 2) with::

        distlib launch: error: unknown option --num-proceses. Did you mean --num-processes?
    """

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: Any = None) -> argparse.Namespace:
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(self.unknown_message(extra))
        return cast(argparse.Namespace, parsed)

    def unknown_message(self, extra: Sequence[str]) -> str:
        """The message for arguments no option or positional took."""
        options = [a for a in extra if a.startswith("-")]
        if not options:
            return (f"unexpected argument{'s' if len(extra) > 1 else ''} "
                    f"{' '.join(extra)}. Run '{self.prog} --help' for the usage.")
        parts = []
        for typed in options:
            near = closest_option(self, typed)
            hint = f"Did you mean {near}?" if near else f"Run '{self.prog} --help' for the options."
            parts.append(f"unknown option {typed.split('=', 1)[0]}. {hint}")
        return " ".join(parts)

    def error(self, message: str) -> NoReturn:
        """Print the usage and ``prog: error: message``; exit with status 2.

        argparse's own messages are tidied: an ambiguous abbreviation lists each option
        once (not its underscore spelling too), and a trailing ``args...`` positional that
        may be empty is not called required.
        """
        ambiguous = re.fullmatch(r"ambiguous option: (\S+) could match (.*)", message)
        if ambiguous:
            matches = dict.fromkeys(f.replace("_", "-") for f in ambiguous[2].split(", "))
            message = (f"ambiguous option: {ambiguous[1]} could match {', '.join(matches)}. "
                       "Write more of its name.")
        required = "the following arguments are required: "
        if message.startswith(required):
            optional = {a.dest for a in self._actions if a.nargs == argparse.REMAINDER}
            names = [n for n in message[len(required):].split(", ") if n not in optional]
            message = required + ", ".join(names)
        self.print_usage()
        self.exit(2, f"{self.prog}: error: {message}\n")
