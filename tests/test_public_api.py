"""`distlib.__all__` is exactly the documented public surface, and every name resolves."""

from __future__ import annotations

import importlib
import subprocess
import sys

import distlib

# The names DESIGN.md fixes, plus the value types they return.
DOCUMENTED = {
    # environment
    "Env", "detect", "Backend", "Launcher", "Mesh",  # Env.backend / Env.launcher hold these str enums
    # strategies
    "Single", "DDP", "FSDP", "DeepSpeed", "XLA", "wrap", "unwrap",
    "AccelerateScheduler",  # what wrap(..., scheduler_steps="accelerate") returns
    # precision and the training step
    "Precision", "accumulate", "backward", "clip_grad_norm", "seed", "MicroStep", "autocast",
    # data
    "shard", "split_between_processes", "ShardPlan", "skip_first_batches",
    # collectives
    "gather", "gather_object", "gather_metrics", "pad_across_processes", "reduce",
    "broadcast", "broadcast_object", "barrier", "main_process_first",
    # checkpoints
    "save_state", "load_state", "save_model",
    # porting conveniences (issue 11: what a port from Accelerate reaches for)
    "main_print", "free_memory",
    # big models
    "init_empty_weights", "init_on_device", "infer_device_map", "load_checkpoint", "dispatch",
    "load_checkpoint_and_dispatch", "DeviceMap",
    # launching
    "launch", "LaunchResult",
    # N-D parallelism (issue 14): the plan before any process starts, and the values it returns
    "plan_parallelism", "ParallelPlan", "TensorPlan", "context_parallel",
    # observing (issue 16): trackers (Trackers is what init_trackers returns), the meter,
    # profiles, and ranks that stop together
    "Tracker", "Trackers", "init_trackers", "StepMeter", "profile", "any_rank",
    # a batch size every rank agrees on (issue 16 item 4)
    "find_executable_batch_size",
}

# Documented names whose issue has not landed yet; each issue removes its names when it lands.
PENDING: set[str] = set()


def test_all_is_the_documented_surface() -> None:
    assert set(distlib.__all__) == DOCUMENTED - PENDING
    assert len(distlib.__all__) == len(set(distlib.__all__))


def test_every_public_name_resolves() -> None:
    for name in distlib.__all__:
        value = getattr(distlib, name)
        assert value is not None, name
        assert getattr(importlib.import_module(distlib._EXPORTS[name]), name) is value


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        distlib.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("distlib.no_such_name resolved")


def test_import_runs_nothing_and_imports_no_torch() -> None:
    code = "import sys, distlib; print('torch' in sys.modules, 'yaml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]


def test_public_names_look_public() -> None:
    """`__module__` is "distlib" on what distlib hands out, and dir() shows only the API."""
    code = ("import distlib as dl\n"
            "print(dl.Env.__module__, dl.wrap.__module__, dl.Precision.__module__)\n"
            "print(sorted(dir(dl)) == sorted([*dl.__all__, '__version__']))\n"
            "import pickle\n"
            "env = dl.Env(world_size=2, rank=1)\n"
            "print(pickle.loads(pickle.dumps(env)) == env, repr(dl.Env)[:20])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    lines = out.stdout.splitlines()
    assert lines[0] == "distlib distlib distlib"
    assert lines[1] == "True"
    assert lines[2] == "True <class 'distlib.Env'"


def test_class_doctests_are_collected_in_their_module_after_public_access() -> None:
    """The root conftest keeps Env's examples in distlib/env.py once dl.Env was touched."""
    import doctest

    import distlib.env

    assert distlib.Env.__module__ == "distlib"
    names = {t.name for t in doctest.DocTestFinder().find(distlib.env) if t.examples}
    assert {"distlib.env.Env", "distlib.env.detect"} <= names
    for name in distlib.__all__:
        getattr(distlib, name)
    assert not [t for t in doctest.DocTestFinder().find(distlib) if t.examples]
