"""``distlib config``: write the launch config by answering questions, or with defaults.

The questions are read line by line from stdin, so answers can be piped in (an empty line or
the end of input takes the default shown in brackets). A question that says ``(yes/no)`` takes
y/n, yes/no, true/false or on/off in any case. An invalid answer is named in the question's
words; at a terminal the question is asked again (three tries), from a pipe the command stops
at once. Ctrl-C at any question writes nothing. The file is YAML written with
``yaml.safe_dump``; its keys are ``distlib launch``'s option names.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO

from distlib.cli._args import spellings
from distlib.env import probe_hardware
from distlib.errors import ConfigError
from distlib.launcher.config import default_config_path, read_config_file, validate
from distlib.launcher.plan import parse_machines
from distlib.launcher.settings import SETTINGS, TABLE, Setting

__all__ = ["ABORTED", "QUESTIONS", "add_arguments", "ask", "check_answer", "default_config",
           "run", "write_config"]

# What Ctrl-C at a question prints (on stderr) before ``distlib config`` exits 130.
ABORTED = "distlib config: aborted, nothing written"

# When each kind of question is asked, given the answers so far (`Setting.ask_when`).
_ASKED: dict[str, Callable[[Mapping[str, Any]], bool]] = {
    "always": lambda answers: True,
    "several machines": lambda answers: answers["num_machines"] != "1",
    "gpus": lambda answers: not answers["cpu"],
    "fsdp": lambda answers: answers["strategy"] == "fsdp",
    "deepspeed": lambda answers: answers["strategy"] == "deepspeed",
}

# The settings ``distlib config`` asks about, in the order it asks (from the settings table).
QUESTIONS: tuple[Setting, ...] = tuple(sorted((s for s in TABLE if s.question),
                                              key=lambda s: s.ask_order))

# The words a yes/no question takes (any case).
_YES = ("y", "yes", "true", "on", "1")
_NO = ("n", "no", "false", "off", "0")

# The bounds of the numbers asked, where the setting's type alone allows more.
_RANGE: dict[str, tuple[int, int | None]] = {"num_processes": (1, None),
                                             "machine_rank": (0, None),
                                             "main_port": (0, 65535)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's options."""
    parser.add_argument("action", nargs="?", choices=["default"],
                        help="'default': write a config for this hardware without questions")
    parser.add_argument(*spellings("--config-file"), default=None, metavar="PATH",
                        help="where to write (default: $DISTLIB_CONFIG_FILE, else "
                             "~/.cache/distlib/default_config.yaml)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def _lines(stream: TextIO) -> Iterator[str | None]:
    while True:
        line = stream.readline()
        yield None if not line else line.rstrip("\n")


def _bad(setting: Setting, raw: str, rule: str, fix: str) -> ConfigError:
    return ConfigError(f'the answer to "{setting.question}" must {rule}, but got {raw!r}. {fix}')


def _number(setting: Setting, raw: str) -> int:
    low, high = _RANGE.get(setting.name, (setting.minimum, None))
    rule = "be a whole number" + (f" >= {low}" if low is not None and high is None else "")
    rule += f" from {low} to {high}" if high is not None else ""
    text = raw.strip()
    if not text.lstrip("-").isdigit():
        raise _bad(setting, raw, rule, "Type digits only, such as 2.")
    value = int(text)
    if (low is not None and value < low) or (high is not None and value > high):
        raise _bad(setting, raw, rule, "Type a number in that range.")
    return value


def check_answer(setting: Setting, raw: str) -> Any:
    """Read one answer to ``setting``'s question; return its value as the config file holds it.

    Raises:
        ConfigError: the answer is invalid; the message quotes the question, not the key.

    Examples:
        >>> check_answer(SETTINGS["cpu"], "Y"), check_answer(SETTINGS["num_processes"], " 4 ")
        (True, 4)
        >>> check_answer(SETTINGS["num_processes"], "two")
        Traceback (most recent call last):
        ...
        distlib.errors.ConfigError: the answer to "How many processes in total, across all machines?" must be a whole number >= 1, but got 'two'. Type digits only, such as 2.
    """
    text = raw.strip()
    if setting.kind is bool:
        if text.lower() in _YES + _NO:
            return text.lower() in _YES
        raise _bad(setting, raw, "be yes or no", "Answer y or n (true or false work too).")
    if setting.name == "strategy" and text.lower() == "auto":
        return None
    if setting.name == "num_machines":
        try:
            parse_machines(text)
        except ConfigError:
            raise _bad(setting, raw, "be a count like 2 or a range MIN:MAX like 1:4",
                       "Type 1 for this machine alone.") from None
        return text
    value: Any = _number(setting, raw) if setting.kind is int else text
    if setting.choices:
        value = value.lower() if isinstance(value, str) else value
        if value not in setting.choices:
            words = ", ".join(map(str, setting.choices))
            words += ", auto" if setting.name == "strategy" else ""
            raise _bad(setting, raw, f"be one of {words}", "Type one of those words.")
    if setting.name == "gpu_ids" and text != "all" and not all(
            part.strip().isdigit() for part in text.split(",")):
        raise _bad(setting, raw, "be all or GPU numbers separated by commas, such as 0,1",
                   "Run nvidia-smi -L to see the numbers.")
    return validate({setting.name: value}, "answer")[setting.name]


def _offer(setting: Setting, hardware: Mapping[str, Any]) -> str:
    default: Any = hardware.get(setting.name, setting.default if setting.offer is None
                                else setting.offer)
    if isinstance(default, bool):
        return "yes" if default else "no"
    return str(default)


def _prompt(setting: Setting, default: str) -> str:
    if setting.kind is bool:
        choices = " (yes/no)"
    elif setting.choices:
        extra = ", auto" if setting.name == "strategy" else ""
        choices = f" ({', '.join(map(str, setting.choices))}{extra})"
    else:
        choices = ""
    return f"{setting.question}{choices} [{default}]: "


def ask(answers_in: TextIO, out: TextIO, num_gpus: int, *, tries: int = 3) -> dict[str, Any]:
    """Ask the questions on ``out``, read answers from ``answers_in``; return the settings.

    Args:
        answers_in: one answer a line; an empty line or the end of input takes the default.
        out: where the questions (and, between tries, the errors) are written.
        num_gpus: the GPUs of this machine, for the defaults offered.
        tries: how often one question is asked before an invalid answer is an error (1 for
            answers from a pipe, which cannot correct themselves).

    Raises:
        ConfigError: an answer is still invalid after ``tries`` tries, or at the end of input.

    Example:
        >>> import io
        >>> ask(io.StringIO("y\\n\\n2\\nddp\\nbf16\\n"), io.StringIO(), num_gpus=0)
        {'cpu': True, 'num_machines': 1, 'num_processes': 2, 'strategy': 'ddp', 'precision': 'bf16'}
    """
    lines = _lines(answers_in)
    hardware = {"cpu": num_gpus == 0, "num_processes": max(num_gpus, 1)}
    answers: dict[str, Any] = {}
    for setting in QUESTIONS:
        if not _ASKED[setting.ask_when](answers):
            continue
        default = _offer(setting, hardware)
        for attempt in range(tries):
            out.write(_prompt(setting, default))
            out.flush()
            raw = next(lines)
            try:
                answers[setting.name] = check_answer(
                    setting, default if raw is None or not raw.strip() else raw)
                break
            except ConfigError as error:
                if attempt == tries - 1 or raw is None:
                    out.write("\n")
                    raise
                out.write(f"\n  {error}\n")
        out.write("\n")
    if str(answers.get("num_machines", "")).isdigit():
        answers["num_machines"] = int(answers["num_machines"])
    # A mesh size of 1 is what leaving the axis out means: it is not written, so a file
    # answered with the defaults names no mesh (each rank keeps all data parallel).
    return {k: v for k, v in answers.items() if v not in (None, "")
            and not (SETTINGS[k].mesh_axis is not None and v == 1)}


def default_config(num_gpus: int) -> dict[str, Any]:
    """The config ``distlib config default`` writes for a machine with ``num_gpus`` GPUs.

    Example:
        >>> default_config(0)
        {'num_machines': 1, 'num_processes': 1, 'cpu': True, 'precision': 'no'}
    """
    return {"num_machines": 1, "num_processes": max(num_gpus, 1), "cpu": num_gpus == 0,
            "precision": "no"}


def _refuse_existing(path: str) -> None:
    msg = (f"distlib config: the config file must not exist yet, but got {path!r}, which "
           "does. Pass --force to overwrite it, or --config-file for another path.")
    raise ConfigError(msg)


def write_config(path: str, values: Mapping[str, Any], *, force: bool) -> None:
    """Write ``values`` as YAML to ``path`` (refusing to overwrite unless ``force``).

    The file appears whole or not at all (written beside it, then renamed).

    Effects: creates the directory and writes the file.
    """
    import yaml

    if os.path.exists(path) and not force:
        _refuse_existing(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, staged = tempfile.mkstemp(dir=folder, prefix=".distlib-config-", suffix=".yaml")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            yaml.safe_dump(dict(values), stream, sort_keys=False)
        os.chmod(staged, 0o644)
        os.replace(staged, path)
    except BaseException:
        os.unlink(staged)
        raise


def run(args: argparse.Namespace) -> int:
    """Write the config file and say where; Ctrl-C before it is written writes nothing.

    An existing file (without ``--force``) is refused first, before torch is imported to
    count the GPUs.
    """
    path = args.config_file or default_config_path(os.environ, writing=True)
    if os.path.exists(path) and not args.force:
        _refuse_existing(path)
    try:
        num_gpus = probe_hardware().num_gpus
        if args.action == "default":
            values = default_config(num_gpus)
        else:
            values = ask(sys.stdin, sys.stdout, num_gpus, tries=3 if sys.stdin.isatty() else 1)
    except KeyboardInterrupt:
        sys.stdout.write("\n")  # end the question's line
        sys.stdout.flush()
        print(ABORTED, file=sys.stderr)
        return 130
    write_config(path, values, force=args.force)
    read_config_file(path)  # what was written must read back
    print(f"distlib config: wrote {path}")
    return 0
