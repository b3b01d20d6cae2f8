"""docs/reference.md is generated from `distlib._EXPORTS`: every public name, at the module
that defines it, and every entry resolves. Regenerate with ``python tests/test_reference.py``.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

import distlib

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "reference.md"

HEAD = """# API reference

Every public name is importable from `distlib` (`import distlib as dl`); each entry below
shows the module that defines it. This page is generated from `distlib._EXPORTS` by
`python tests/test_reference.py` (a test fails when it is out of date).
"""

# (heading, entries): a bare name is public (its module comes from _EXPORTS); a dotted path
# is a documented name that is not in __all__ (extension points, the runtime, the errors).
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Environment", ("Env", "detect", "Backend", "Launcher", "Mesh", "distlib.env.Hardware")),
    ("Strategies and wrapping", ("wrap", "unwrap", "Single", "DDP", "FSDP", "DeepSpeed", "XLA",
                                 "AccelerateScheduler", "distlib.strategies.base.Strategy",
                                 "distlib.training.wrapped.Wrapped")),
    ("Precision and the training step", ("Precision", "accumulate", "MicroStep", "backward",
                                         "clip_grad_norm", "seed", "autocast", "any_rank")),
    ("Data", ("shard", "skip_first_batches", "split_between_processes", "ShardPlan")),
    ("Collectives", ("gather", "gather_object", "pad_across_processes", "reduce", "broadcast",
                     "broadcast_object", "barrier", "main_process_first")),
    ("Evaluation", ("gather_metrics",)),
    ("Observing", ("init_trackers", "Tracker", "Trackers", "StepMeter",
                   "distlib.observe.meter.PEAK_FLOPS", "profile")),
    ("Checkpoints", ("save_state", "load_state", "save_model",
                     "distlib.checkpoint.export.export_weights",
                     "distlib.checkpoint.export.merge_weights")),
    ("Big models", ("init_empty_weights", "init_on_device", "infer_device_map", "DeviceMap",
                    "load_checkpoint", "dispatch", "load_checkpoint_and_dispatch")),
    ("Parallelism", ("context_parallel", "plan_parallelism", "ParallelPlan", "TensorPlan",
                     "distlib.training.plan.check_parallelism")),
    ("Launching", ("launch", "LaunchResult")),
    ("Porting conveniences", ("main_print", "free_memory")),
    ("Runtime", ("distlib.runtime.initialize", "distlib.runtime.process_group",
                 "distlib.runtime.shutdown")),
    ("Errors", ("distlib.errors",)),
)


def _path(entry: str) -> str:
    return entry if "." in entry else f"{distlib._EXPORTS[entry]}.{entry}"


def render() -> str:
    """The page's text."""
    parts = [HEAD]
    for heading, entries in SECTIONS:
        parts.append(f"## {heading}\n\n" + "\n\n".join(f"::: {_path(e)}" for e in entries) + "\n")
    return "\n".join(parts)


def _resolve(path: str) -> object:
    try:
        return importlib.import_module(path)
    except ImportError:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)


def test_every_public_name_is_on_the_page_once() -> None:
    listed = [e for _, entries in SECTIONS for e in entries if "." not in e]
    assert sorted(listed) == sorted(distlib.__all__)


def test_every_entry_resolves_to_its_defining_module() -> None:
    for _, entries in SECTIONS:
        for entry in entries:
            value = _resolve(_path(entry))
            if "." not in entry:
                assert value is getattr(distlib, entry), entry


def test_the_page_is_generated() -> None:
    assert PAGE.read_text(encoding="utf-8") == render(), (
        "docs/reference.md is out of date: run `python tests/test_reference.py`")


if __name__ == "__main__":
    PAGE.write_text(render(), encoding="utf-8")
    sys.exit(0)
