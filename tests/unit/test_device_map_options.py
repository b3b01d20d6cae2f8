"""infer_device_map's Accelerate options ``fallback_allocation`` and ``offload_buffers``
(issue 17, item 5): the same maps and the same warnings as Accelerate's
``infer_auto_device_map`` for the same input; non-bools refused; a user's script through
``distlib launch``."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.big_model.device_map import infer_device_map
from distlib.big_model.empty import init_empty_weights
from distlib.errors import DeviceMapError
from tests.unit.test_big_model import _empty, _gpt2_config, _llama_config

accelerate_utils = pytest.importorskip("accelerate.utils")


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(width, width)
        self.register_buffer("scale", torch.ones(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) @ self.scale


def _uneven() -> torch.nn.Module:
    """Layers of very different sizes, so a device that cannot take the next one may take a
    later, smaller one (what fallback_allocation looks for); buffers in every block."""
    with init_empty_weights():
        return torch.nn.Sequential(torch.nn.Linear(64, 64), Block(8), torch.nn.Linear(4, 4),
                                   torch.nn.Sequential(torch.nn.Linear(48, 48), Block(4)),
                                   torch.nn.Linear(16, 16), Block(2))


def _theirs(model: Any, budget: dict[Any, int], split: list[str], **options: Any) -> tuple[
        dict[str, Any], list[str]]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        found = accelerate_utils.infer_auto_device_map(model, dict(budget), split, **options)
    return dict(found), [str(w.message) for w in seen]


def _ours(model: Any, budget: dict[Any, int], split: list[str], **options: Any) -> tuple[
        dict[str, Any], list[str]]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        found = infer_device_map(model, budget, split, **options)
    return found.as_dict(), [str(w.message) for w in seen]


def _models() -> list[tuple[str, Any, list[str]]]:
    return [("uneven", _uneven(), ["Block"]), ("gpt2", _empty(_gpt2_config()), ["GPT2Block"]),
            ("llama", _empty(_llama_config()), ["LlamaDecoderLayer"]),
            ("tied-llama", _empty(_llama_config(tie_word_embeddings=True)), ["LlamaDecoderLayer"])]


@pytest.mark.usefixtures("transformers")
def test_fallback_allocation_maps_equal_accelerates() -> None:
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    rng = random.Random(0)
    changed = cases = 0
    for name, model, no_split in _models():
        total = sum(p.numel() * 4 for p in model.parameters())
        for _ in range(40):
            gpus = rng.randint(0, 2)
            budget: dict[Any, int] = {i: rng.randint(0, total // 2) for i in range(gpus)}
            budget["cpu"] = rng.randint(0, total)
            split = rng.choice([[], no_split])
            theirs, _ = _theirs(model, budget, split, fallback_allocation=True)
            ours, _ = _ours(model, budget, split, fallback_allocation=True)
            assert ours == theirs, (name, budget, split)
            plain, _ = _ours(model, budget, split)
            changed += plain != ours
            cases += 1
    assert cases == 160
    assert changed >= 10, changed  # the budgets reach the case the option is for


def test_fallback_puts_a_later_smaller_module_on_a_device_the_next_one_does_not_fit() -> None:
    model = _uneven()
    # GPU 0 keeps 16,640 bytes for the largest layer ("0" itself), so "0" does not fit in
    # what is left (3,360 bytes); block "1" (544 bytes) does
    budget = {0: 20_000, "cpu": 10**6}
    plain, _ = _ours(model, budget, ["Block"])
    ours, seen = _ours(model, budget, ["Block"], fallback_allocation=True)
    assert plain == {"": "cpu"}
    assert ours["1"] == 0 and set(ours.values()) == {0, "cpu"}, ours
    assert ours == _theirs(model, budget, ["Block"], fallback_allocation=True)[0]
    assert not [s for s in seen if "fallback_allocation" in s]


def test_fallback_that_finds_nothing_warns_per_device() -> None:
    model = _uneven()
    budget = {0: 10, 1: 10, "cpu": 10**6}  # nothing at all fits 10 bytes
    ours, seen = _ours(model, budget, ["Block"], fallback_allocation=True)
    assert set(ours.values()) == {"cpu"}
    found = [s for s in seen if "fallback_allocation found no module" in s]
    assert len(found) == 2 and "on 0 " in found[0] and "on 1 " in found[1], found
    assert "budget 10 bytes" in found[0] and "Raise its budget" in found[0]


def test_buffers_of_offloaded_modules_warn_as_accelerate_unless_offloaded() -> None:
    rng = random.Random(1)
    model = _uneven()
    total = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
    warned = cases = 0
    for _ in range(60):
        budget = {0: rng.randint(0, total), "cpu": rng.randint(0, total)}
        for offload in (False, True):
            theirs, their_warnings = _theirs(model, budget, ["Block"], offload_buffers=offload)
            ours, our_warnings = _ours(model, budget, ["Block"], offload_buffers=offload)
            assert ours == theirs, budget  # the map is the same either way
            theirs_warn = any("offload_buffers=True" in w for w in their_warnings)
            ours_warn = any("offload_buffers=True" in w for w in our_warnings)
            assert ours_warn == theirs_warn, (budget, offload, our_warnings, their_warnings)
            warned += ours_warn
            cases += 1
            if offload:
                assert not ours_warn
    assert cases == 120 and warned >= 5, warned


@pytest.mark.parametrize("value", ["no", "False", 1, 0, None, 1.0, [True]])
@pytest.mark.parametrize("option", ["offload_buffers", "fallback_allocation"])
def test_non_bools_are_refused_by_name(option: str, value: Any, tmp_path: Path) -> None:
    model = _uneven()
    with pytest.raises(DeviceMapError) as err:
        infer_device_map(model, {"cpu": 10**6}, **{option: value})
    text = str(err.value)
    assert f"infer_device_map(): {option} must be True or False, but got {value!r}" in text
    assert f"Pass {option}=True or {option}=False." in text
    with pytest.raises(DeviceMapError, match=f"load_checkpoint_and_dispatch\\(\\): {option} must"):
        dl.load_checkpoint_and_dispatch(model, tmp_path, "auto", **{option: value})
    if option == "offload_buffers":
        with pytest.raises(DeviceMapError, match="dispatch\\(\\): offload_buffers must"):
            dl.dispatch(torch.nn.Linear(2, 2), {"": "cpu"}, offload_buffers=value)


def test_fallback_with_a_map_nothing_plans_is_refused(tmp_path: Path) -> None:
    for given, shown in (({"": "cpu"}, "a map"), (None, "None")):
        with pytest.raises(DeviceMapError) as err:
            dl.load_checkpoint_and_dispatch(_uneven(), tmp_path, given, fallback_allocation=True)
        assert "fallback_allocation=True must come with a device_map to plan" in str(err.value)
        assert f"device_map={shown}" in str(err.value) and "device_map='auto'" in str(err.value)


SCRIPT = textwrap.dedent("""
    # A user's script: save a model, load it back planned with Accelerate's options.
    import sys, torch
    from safetensors.torch import save_file
    import distlib as dl

    class Block(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.inner = torch.nn.Linear(width, width)
            self.register_buffer("scale", torch.full((width, width), 0.5))
        def forward(self, x):
            return self.inner(x) @ self.scale

    def build():
        return torch.nn.Sequential(torch.nn.Linear(64, 64), Block(64), torch.nn.Linear(64, 4),
                                   Block(4))

    torch.manual_seed(0)
    model = build()
    folder = sys.argv[1]
    save_file(model.state_dict(), folder + "/model.safetensors")
    x = torch.randn(3, 64)
    want = model(x)
    with dl.init_empty_weights():
        empty = build()
    loaded = dl.load_checkpoint_and_dispatch(
        empty, folder, "auto", max_memory={"cpu": 40_000, "disk": 10**9},
        offload_folder=folder + "/offload", no_split_module_classes=["Block"],
        offload_buffers=True, fallback_allocation=True, quiet=True)
    torch.testing.assert_close(loaded(x), want)
    print("MAP", sorted(loaded.hf_device_map.items()))
""")


def test_a_users_script_loads_with_both_options_through_distlib_launch(tmp_path: Path) -> None:
    (tmp_path / "load.py").write_text(SCRIPT)
    done = subprocess.run([sys.executable, "-m", "distlib", "launch", "--cpu", "load.py",
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("MAP"))
    # the CPU keeps 33,024 bytes of its 40,000 for the largest layer (block "1"), so "0"
    # (16,640) does not fit and, without the fallback, everything goes to disk; the fallback
    # puts "2" (1,040) on the CPU. The forward equals the plain model's (asserted in the script)
    assert line == "MAP [('0', 'disk'), ('1', 'disk'), ('2', 'cpu'), ('3', 'disk')]", line
