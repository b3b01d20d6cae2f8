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

from distlib.errors import ConfigError
from distlib.launcher.config import SETTINGS, default_config_path, read_config_file, validate

__all__ = ["add_arguments", "ask", "default_config", "run", "write_config"]

# (setting, question, condition on the answers so far)
_Question = tuple[str, str, Callable[[Mapping[str, Any]], bool]]
_ALWAYS: Callable[[Mapping[str, Any]], bool] = lambda answers: True  # noqa: E731
QUESTIONS: tuple[_Question, ...] = (
    ("cpu", "Run on CPUs only, even if GPUs are present?", _ALWAYS),
    ("num_machines", "How many machines take part?", _ALWAYS),
    ("machine_rank", "Rank of this machine (0 hosts the rendezvous)?",
     lambda a: a["num_machines"] != "1"),
    ("main_address", "Address of machine 0?", lambda a: a["num_machines"] != "1"),
    ("main_port", "Port on machine 0?", lambda a: a["num_machines"] != "1"),
    ("rdzv_backend", "Rendezvous backend?", lambda a: a["num_machines"] != "1"),
    ("num_processes", "How many processes in total, across all machines?", _ALWAYS),
    ("gpu_ids", "Which GPUs on this machine (e.g. 0,1)?", lambda a: not a["cpu"]),
    ("strategy", "Distribution strategy?", _ALWAYS),
    ("fsdp_reshard_after_forward", "FSDP: free gathered parameters after forward?",
     lambda a: a["strategy"] == "fsdp"),
    ("fsdp_cpu_offload", "FSDP: keep parameters on the CPU?", lambda a: a["strategy"] == "fsdp"),
    ("fsdp_wrap_classes", "FSDP: module classes to shard separately (comma-separated)?",
     lambda a: a["strategy"] == "fsdp"),
    ("fsdp_activation_checkpointing", "FSDP: activation checkpointing?",
     lambda a: a["strategy"] == "fsdp"),
    ("fsdp_state_dict_type", "FSDP: checkpoint layout?", lambda a: a["strategy"] == "fsdp"),
    ("zero_stage", "DeepSpeed: ZeRO stage?", lambda a: a["strategy"] == "deepspeed"),
    ("offload_optimizer_device", "DeepSpeed: offload optimizer states to?",
     lambda a: a["strategy"] == "deepspeed"),
    ("offload_param_device", "DeepSpeed: offload parameters to?",
     lambda a: a["strategy"] == "deepspeed"),
    ("precision", "Mixed precision?", _ALWAYS),
)
_DEFAULTS = {"num_machines": "1", "main_port": 29500, "strategy": "auto",
             "fsdp_reshard_after_forward": True, "fsdp_cpu_offload": False,
             "fsdp_activation_checkpointing": False, "fsdp_state_dict_type": "sharded",
             "zero_stage": 2, "offload_optimizer_device": "none",
             "offload_param_device": "none", "fsdp_wrap_classes": ""}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's options."""
    parser.add_argument("action", nargs="?", choices=["default"],
                        help="'default': write a config for this hardware without questions")
    parser.add_argument("--config-file", default=None, metavar="PATH",
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
    defaults = _DEFAULTS | {"cpu": num_gpus == 0, "num_processes": max(num_gpus, 1)}
    answers: dict[str, Any] = {}
    for name, question, condition in QUESTIONS:
        if not condition(answers):
            continue
        setting = SETTINGS[name]
        default: Any = defaults.get(name, setting.default)
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
    return {k: v for k, v in answers.items() if v not in (None, "")}


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
    from distlib.env import probe_hardware

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
