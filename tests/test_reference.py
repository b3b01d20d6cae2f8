"""docs/reference.md is generated from `distlib._EXPORTS`: every public name, at the module
that defines it, and every entry resolves. Regenerate with ``python tests/test_reference.py``.

The built site is checked too: every name of ``distlib.__all__`` is a heading of the rendered
reference page, and so is every field of a value type (``Env.rank``, ``FSDP.wrap_classes``).
The site comes from ``$DISTLIB_SITE_DIR`` (the nox docs session builds it once) or is built
here with ``mkdocs build --strict``; without mkdocs (the ``tests`` session) those tests skip:
the ``docs`` session runs them.
"""

from __future__ import annotations

import dataclasses
import html.parser
import importlib
import os
import pathlib
import subprocess
import sys

import pytest

import distlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference.md"

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
                                         "clip_grad_norm", "seed", "autocast", "any_rank",
                                         "find_executable_batch_size")),
    ("Data", ("shard", "skip_first_batches", "split_between_processes", "ShardPlan")),
    ("Collectives", ("gather", "gather_object", "pad_across_processes", "reduce", "broadcast",
                     "broadcast_object", "barrier", "main_process_first")),
    ("Evaluation", ("gather_metrics",)),
    ("Observing", ("init_trackers", "Tracker", "Trackers", "StepMeter",
                   "distlib.observe.meter.PEAK_FLOPS", "profile")),
    ("Checkpoints", ("save_state", "load_state", "save_model",
                     "distlib.checkpoint.SaveHandle", "distlib.checkpoint.latest_checkpoint",
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


def _resolve(path: str) -> object:
    try:
        return importlib.import_module(path)
    except ImportError:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)


def _fields(entry: str) -> list[str]:
    """The public fields of a value type (a dataclass); none for anything else."""
    value = _resolve(_path(entry))
    if not (isinstance(value, type) and dataclasses.is_dataclass(value)):
        return []
    return [f.name for f in dataclasses.fields(value) if not f.name.startswith("_")]


# A value type's fields have no docstrings of their own: list them anyway, without the
# dataclass machinery (__init__, __post_init__) and the "class-attribute" labels.
VALUE_OPTIONS = """
    options:
      show_if_no_docstring: true
      show_labels: false
      filters: ["!^_[^_]", "!^__init__$", "!^__post_init__$"]"""


def _directive(entry: str) -> str:
    return f"::: {_path(entry)}{VALUE_OPTIONS if _fields(entry) else ''}"


def render() -> str:
    """The page's text."""
    parts = [HEAD]
    for heading, entries in SECTIONS:
        parts.append(f"## {heading}\n\n" + "\n\n".join(_directive(e) for e in entries) + "\n")
    return "\n".join(parts)


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


class _Headings(html.parser.HTMLParser):
    """The ids of a page's headings."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in {"h1", "h2", "h3", "h4", "h5", "h6"}:
            self.ids.update(v for k, v in attrs if k == "id" and v)


def build_site(folder: pathlib.Path) -> pathlib.Path:
    """Build the site with ``mkdocs build --strict`` into ``folder`` (or fail the test)."""
    pytest.importorskip("mkdocs", reason="mkdocs is in the docs extra: the docs session runs "
                        "this test")
    environ = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(folder)], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}{done.stderr}"
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    given = os.environ.get("DISTLIB_SITE_DIR")
    return pathlib.Path(given) if given else build_site(tmp_path_factory.mktemp("site"))


def test_every_public_name_and_field_is_a_heading_of_the_built_page(
        site: pathlib.Path) -> None:
    page = _Headings()
    page.feed((site / "reference" / "index.html").read_text(encoding="utf-8"))
    missing = [name for name in distlib.__all__ if _path(name) not in page.ids]
    assert not missing, f"public names without a heading on the built reference: {missing}"
    entries = [e for _, group in SECTIONS for e in group]
    fields = [f"{_path(e)}.{f}" for e in entries for f in _fields(e)]
    assert "distlib.env.Env.rank" in fields and "distlib.strategies.fsdp.FSDP.wrap_classes" in fields
    missing = [f for f in fields if f not in page.ids]
    assert not missing, f"fields without a heading on the built reference: {missing}"


if __name__ == "__main__":
    PAGE.write_text(render(), encoding="utf-8")
    sys.exit(0)
