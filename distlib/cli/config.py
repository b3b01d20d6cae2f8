"""``distlib config``: write the launch config by answering questions, or with defaults.

The questions are read line by line from stdin, so answers can be piped in (an empty line or
the end of input takes the default shown in brackets). The file is YAML written with
``yaml.safe_dump``; its keys are ``distlib launch``'s option names.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO

from distlib.cli._args import spellings
from distlib.env import probe_hardware
from distlib.errors import ConfigError
from distlib.launcher.config import default_config_path, read_config_file, validate
from distlib.launcher.settings import SETTINGS, TABLE, Setting

__all__ = ["QUESTIONS", "add_arguments", "ask", "default_config", "run", "write_config"]

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


def ask(answers_in: TextIO, out: TextIO, num_gpus: int) -> dict[str, Any]:
    """Ask the questions on ``out``, read answers from ``answers_in``; return the settings.

    Raises:
        ConfigError: an answer stays invalid after three tries.

    Example:
        >>> import io
        >>> ask(io.StringIO("yes\\n\\n2\\nddp\\nbf16\\n"), io.StringIO(), num_gpus=0)
        {'cpu': True, 'num_machines': 1, 'num_processes': 2, 'strategy': 'ddp', 'precision': 'bf16'}
    """
    lines = _lines(answers_in)
    hardware = {"cpu": num_gpus == 0, "num_processes": max(num_gpus, 1)}
    answers: dict[str, Any] = {}
    for setting in QUESTIONS:
        name, question = setting.name, str(setting.question)
        if not _ASKED[setting.ask_when](answers):
            continue
        default: Any = hardware.get(name, setting.default if setting.offer is None
                                    else setting.offer)
        if isinstance(default, bool):
            default = "yes" if default else "no"
        choices = f" ({', '.join(map(str, setting.choices))})" if setting.choices else ""
        for attempt in range(3):
            out.write(f"{question}{choices} [{default}]: ")
            out.flush()
            raw = next(lines)
            text = default if raw is None or not raw.strip() else raw.strip()
            if name == "strategy" and str(text).lower() == "auto":
                answers[name] = None
                break
            try:
                answers[name] = validate({name: text}, "answer")[name]
                break
            except ConfigError as error:
                out.write(f"\n  {error}\n")
                if attempt == 2 or raw is None:
                    raise
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


def write_config(path: str, values: Mapping[str, Any], *, force: bool) -> None:
    """Write ``values`` as YAML to ``path`` (refusing to overwrite unless ``force``).

    Effects: creates the directory and writes the file.
    """
    import yaml

    if os.path.exists(path) and not force:
        msg = (f"distlib config: the config file must not exist yet, but got {path!r}, which "
               "does. Pass --force to overwrite it, or --config-file for another path.")
        raise ConfigError(msg)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(dict(values), handle, sort_keys=False)


def run(args: argparse.Namespace) -> int:
    """Write the config file and say where."""
    path = args.config_file or default_config_path(os.environ, writing=True)
    num_gpus = probe_hardware().num_gpus
    if args.action == "default":
        values = default_config(num_gpus)
    else:
        if os.path.exists(path) and not args.force:
            write_config(path, {}, force=False)  # raises the "exists" error before asking
        values = ask(sys.stdin, sys.stdout, num_gpus)
    write_config(path, values, force=args.force or args.action != "default")
    read_config_file(path)  # what was written must read back
    print(f"distlib config: wrote {path}")
    return 0
