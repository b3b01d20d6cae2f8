"""The launcher's payload: importable callables by reference, `__main__`'s by value (cloudpickle),
file names kept for tracebacks, and an error naming the piece that cannot be pickled."""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import distlib as dl
from distlib.errors import LaunchError
from distlib.launcher._payload import dumps, loads

# What a notebook cell or `python -c` defines: code compiled under __name__ == "__main__".
MAIN_SOURCE = """\
import dataclasses

class Scale:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, x):
        return x * self.factor

@dataclasses.dataclass(frozen=True)
class Config:
    factor: int = 3

def train(cfg, x):
    if x < 0:
        raise ValueError(f"x must be >= 0, got {x}")
    return [Scale(cfg.factor)(x), cfg]
"""
CELL = "/home/user/notebooks/cell-7.py"  # the name ipykernel gives a cell, in spirit


def _main_namespace() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(MAIN_SOURCE, CELL, "exec"), namespace)  # our own source, as a cell
    return namespace


def module_level(x: int) -> int:
    return x + 1


def _in_a_fresh_interpreter(data: bytes, call: str, tmp_path: Path
                            ) -> subprocess.CompletedProcess[str]:
    """Load ``data`` as a rank does: another interpreter, whose ``__main__`` defines nothing."""
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(data)
    code = ("import sys; from distlib.launcher._payload import loads\n"
            f"target, args = loads(open(sys.argv[1], 'rb').read())\n{call}")
    return subprocess.run([sys.executable, "-c", code, str(payload)], capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_importable_functions_travel_by_reference() -> None:
    for target in (module_level, os.path.join, dl.detect, functools.partial(module_level, 1)):
        data = dumps((target, ()))
        assert b"_code_with_filename" not in data  # no code object inside
        back, _ = loads(data)
        assert back is target or (back.func is module_level and back.args == (1,))


def test_main_functions_and_classes_travel_by_value_to_a_fresh_interpreter(
        tmp_path: Path) -> None:
    ns = _main_namespace()
    data = dumps((ns["train"], (ns["Config"](factor=4), 5)))
    assert b"_code_with_filename" in data
    done = _in_a_fresh_interpreter(data, "print(repr(target(*args)))", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[20, Config(factor=4)]"


def test_a_class_shipped_by_value_comes_back_as_the_callers_class() -> None:
    ns = _main_namespace()
    cfg = ns["Config"](factor=2)
    value = loads(dumps([cfg, ns["Config"]]))  # what a rank sends back after loading it
    assert type(value[0]) is ns["Config"] and value[0] == cfg and value[1] is ns["Config"]


def test_code_shipped_by_value_keeps_its_file_name_for_tracebacks(tmp_path: Path) -> None:
    ns = _main_namespace()
    back, _ = loads(dumps((ns["train"], ())))
    assert back.__code__.co_filename == CELL  # cloudpickle alone would say <dynamic-code>
    done = _in_a_fresh_interpreter(dumps((ns["train"], (ns["Config"](), -1))),
                                   "target(*args)", tmp_path)
    assert done.returncode == 1
    assert f'File "{CELL}", line 16, in train' in done.stderr, done.stderr
    assert "ValueError: x must be >= 0, got -1" in done.stderr


LOCK = threading.Lock()


def uses_the_lock() -> None:
    with LOCK:
        pass


@dataclasses.dataclass
class Holder:
    guard: Any


class Trainer:
    def __init__(self) -> None:
        self.lock = LOCK

    def fit(self) -> None:
        pass


def _captures() -> Any:
    guard = LOCK
    return lambda: guard


CALLS = [  # (target, args, the expression named, what it is part of)
    (module_level, (1, LOCK), "`args[1]`", "an argument launch() passes to the target"),
    (module_level, (Holder(LOCK),), "`args[0].guard`", "an argument launch() passes"),
    (module_level, ({"run": [LOCK]},), "`args[0]['run'][0]`", "an argument launch() passes"),
    (functools.partial(module_level, x=LOCK), (), "`target.keywords['x']`", "launch()'s target"),
    (Trainer().fit, (), "`target.__self__.lock`", "launch()'s target"),
    (lambda: LOCK, (), "`LOCK` (a global that `<lambda>` uses)", ""),
    (_captures(), (), "`guard` (a variable that `_captures.<locals>.<lambda>` captures)", ""),
    (uses_the_lock, (), "", ""),  # importable: by reference, nothing to refuse
]


@pytest.mark.parametrize(("target", "args", "expr", "context"), CALLS)
def test_what_cannot_be_pickled_is_named_with_a_fix(target: Any, args: tuple[Any, ...],
                                                    expr: str, context: str) -> None:
    if not expr:
        assert loads(dumps((target, args)))[0] is target
        return
    with pytest.raises(LaunchError) as info:
        dumps((target, args))
    message = str(info.value)
    assert message.startswith(f"launch(): {expr}"), message
    assert context in message
    assert "must be picklable" in message and "but got a `lock`" in message
    assert "cannot pickle '_thread.lock' object" in message
    assert "Build it inside the target" in message
    assert isinstance(info.value, RuntimeError)


def test_a_result_that_cannot_be_pickled_is_named_with_a_fix() -> None:
    with pytest.raises(LaunchError, match=r"^launch\(\): `value\['rows'\]` \(the value the "
                       r"target returned\) must be picklable .*`generator`.* Return plain"):
        dumps({"loss": 0.5, "rows": (row for row in range(3))})


def test_launch_refuses_an_unpicklable_argument_before_starting_anything() -> None:
    with pytest.raises(LaunchError, match=r"`args\[0\]` \(an argument launch\(\) passes"):
        dl.launch(module_level, LOCK, num_processes=2, cpu=True, timeout_s=60)
