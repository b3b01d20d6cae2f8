"""`offload_buffers` and `fallback_allocation`: the same maps and warnings as Accelerate's
``infer_auto_device_map`` on small models (tiny transformers models from configs, models with
large buffers) over budgets where the options matter; where `dispatch` keeps buffers with
``offload_buffers``, and a forward through them; switches that are not bools are refused."""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distlib.big_model.device_map import DeviceMap, infer_device_map, plan_layout
from distlib.big_model.empty import init_empty_weights
from distlib.big_model.hooks import HookState
from distlib.big_model.offload import OFFLOAD_ATTR
from distlib.big_model.placement import _plan_slots, dispatch, load_checkpoint_and_dispatch
from distlib.big_model.sizes import layout_of, module_sizes
from distlib.errors import DeviceMapError

ORDER = ("cpu", "disk")
BUFFER_WARNING = "offload_buffers=True"  # both libraries' buffer warnings say it
FALLBACK_WARNING = "fallback_allocation=True found no module"


# --- models -----------------------------------------------------------------------------------

class Block(torch.nn.Module):
    """A linear layer and a norm, with an optional (large) buffer added to the output."""

    def __init__(self, width: int, table: int = 0, persistent: bool = True) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)
        if table:
            self.register_buffer("table", torch.linspace(-1, 1, table * width).view(table, width),
                                 persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.proj(x))
        table = getattr(self, "table", None)
        return out if table is None else out + table.mean(0)


class Net(torch.nn.Module):
    """Blocks of mixed widths between an embedding and a head (forward only when all equal)."""

    def __init__(self, widths: tuple[int, ...], tables: tuple[int, ...],
                 persistent: tuple[bool, ...] | None = None) -> None:
        super().__init__()
        keep = persistent or (True,) * len(widths)
        self.embed = torch.nn.Embedding(40, widths[0])
        self.blocks = torch.nn.ModuleList(
            Block(w, t, p) for w, t, p in zip(widths, tables, keep, strict=True))
        self.head = torch.nn.Linear(widths[-1], 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _llama(layers: int = 3, tied: bool = False) -> Any:
    import transformers

    config = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=32,
                                      intermediate_size=64, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=600,
                                      tie_word_embeddings=tied)
    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config)


def _bert() -> Any:
    import transformers

    config = transformers.BertConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                     num_attention_heads=2, vocab_size=100,
                                     max_position_embeddings=512)  # 8 KiB of int64 buffers
    with init_empty_weights():
        return transformers.AutoModel.from_config(config)


def _net() -> Net:
    with init_empty_weights():
        return Net((64, 8, 48, 8, 64, 16), (0, 0, 96, 0, 24, 0), (True, True, False, True, True, True))


BUILDERS: dict[str, tuple[Callable[[], Any], list[str]]] = {
    "net": (_net, ["Block"]),
    "llama": (_llama, ["LlamaDecoderLayer"]),
    "llama_tied": (functools.partial(_llama, tied=True), ["LlamaDecoderLayer"]),
    "bert": (_bert, ["BertLayer", "BertEmbeddings"]),  # its _no_split_modules
}


@functools.cache
def _model(name: str) -> tuple[Any, list[str]]:
    """(empty model, its no-split classes), built once for the whole file."""
    build, no_split = BUILDERS[name]
    return build(), no_split


# --- the two planners, side by side -----------------------------------------------------------

def _record(call: Callable[[], Any]) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def accelerate() -> Iterator[Any]:
    """Accelerate's planner module, quiet (it logs that GPU 0 is not on this machine)."""
    import logging

    modeling = pytest.importorskip("accelerate.utils.modeling")
    logger = logging.getLogger("accelerate")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield modeling
    logger.setLevel(level)


def _fallback_misses(accelerate: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on Accelerate's ``fallback_allocate``: one entry per call that found nothing."""
    misses: list[int] = []
    real = accelerate.fallback_allocate

    def spy(modules: Any, sizes: Any, size_limit: Any, *args: Any) -> Any:
        found = real(modules, sizes, size_limit, *args)
        if found[0] is None:
            misses.append(size_limit)
        return found

    monkeypatch.setattr(accelerate, "fallback_allocate", spy)
    return misses


def _passed_empty(plan: DeviceMap, budget: dict[Any, int]) -> list[Any]:
    """Devices the walk went past holding no bytes: where a fallback found nothing."""
    order = sorted(budget, key=lambda d: (0, d) if isinstance(d, int) else (1, ORDER.index(d)))
    held = dict(plan.usage)
    reached = max(order.index(d) if d in order else len(order) for d in plan.devices)
    return [d for d in order[:reached] if d != "disk" and not held.get(d)]


def _compare(accelerate: Any, monkeypatch: pytest.MonkeyPatch, name: str, budget: dict[Any, int],
             split: bool, dtype: Any, offload_buffers: bool, fallback: bool,
             mode: str = "sequential") -> tuple[DeviceMap, list[str]] | None:
    """Assert both planners agree on the map and the warnings; None where Accelerate fails.

    (Accelerate's fallback raises IndexError when the search reaches a module tied to the
    one that did not fit, such as a tied ``lm_head``.)
    """
    model, no_split = _model(name)
    classes = no_split if split else []
    theirs_budget = dict(budget)
    if mode != "sequential":
        theirs_budget = accelerate.get_balanced_memory(
            model, dict(budget), no_split_module_classes=classes, dtype=dtype,
            low_zero=mode == "balanced_low_0")
    misses = _fallback_misses(accelerate, monkeypatch)
    try:
        theirs, their_warnings = _record(lambda: accelerate.infer_auto_device_map(
            model, dict(theirs_budget), classes, dtype, offload_buffers=offload_buffers,
            fallback_allocation=fallback))
    except IndexError:
        assert fallback and name == "llama_tied"
        return None
    finally:
        monkeypatch.undo()
    ours, our_warnings = _record(lambda: infer_device_map(
        model, budget, classes, dtype, mode=mode, offload_buffers=offload_buffers,
        fallback_allocation=fallback))
    case = (name, budget, split, dtype, offload_buffers, fallback, mode)
    assert ours.as_dict() == dict(theirs), case
    # the buffer warning: both or neither
    assert any(BUFFER_WARNING in w for w in our_warnings) == \
        any(BUFFER_WARNING in w for w in their_warnings), (case, our_warnings, their_warnings)
    # the fallback warning: once for each device Accelerate's fallback found nothing for
    # (devices given no budget at all excepted)
    warned = [w for w in our_warnings if FALLBACK_WARNING in w]
    empty = _passed_empty(ours, budget if mode == "sequential" else
                          {d: b for d, b in theirs_budget.items()})
    if fallback:
        assert len(misses) == len(empty), (case, misses, empty)
        shown = [d for d in empty if (budget if mode == "sequential" else theirs_budget)[d] > 0]
        assert len(warned) == len(shown), (case, warned, shown)
        for device in shown:
            assert sum(f"for {device!r}," in w for w in warned) == 1, (case, device, warned)
    else:
        assert not misses and not warned
    return ours, our_warnings


def _budgets(rng: random.Random, sizes: dict[str, int]) -> dict[Any, int]:
    """Budgets near the size of some module or tensor of the model (where the options
    matter: a device that takes one module but not the next), or up to the whole model."""
    anchors = sorted(s for s in sizes.values() if s > 0)
    large = [s for s in anchors if s <= sizes[""] // 2][-4:]  # about the largest layer

    def size() -> int:
        draw = rng.random()
        if draw < 0.1:
            return 0
        if draw < 0.4:
            return int(rng.choice(anchors) * rng.uniform(0.8, 2.5))
        if draw < 0.8:  # room for the largest layer, and a little more
            return int(rng.choice(large) * rng.uniform(1.0, 1.6))
        return int(sizes[""] * 10 ** rng.uniform(-2, 0))

    gpus = rng.randint(1, 3) if rng.random() < 0.9 else 0
    budget: dict[Any, int] = {i: size() for i in range(gpus)}
    if rng.random() < 0.8:
        budget["cpu"] = size()
    return budget


@pytest.mark.parametrize("name", list(BUILDERS))
def test_maps_and_warnings_equal_accelerates(accelerate: Any, monkeypatch: pytest.MonkeyPatch,
                                             request: pytest.FixtureRequest, name: str) -> None:
    if name != "net":
        request.getfixturevalue("transformers")  # skips without it (an optional test dep)
    rng = random.Random(name)
    sizes = module_sizes(layout_of(_model(name)[0]))
    changed = buffer_warnings = fallback_warnings = compared = 0
    for _ in range(45):
        budget = _budgets(rng, sizes)
        split = rng.random() < 0.7
        dtype = rng.choice([None, torch.float16])
        mode = rng.choice(["sequential"] * 3 + ["balanced", "balanced_low_0"])
        results = {}
        for offload_buffers in (False, True):
            for fallback in (False, True):
                got = _compare(accelerate, monkeypatch, name, budget, split, dtype,
                               offload_buffers, fallback, mode)
                if got is not None:
                    results[offload_buffers, fallback] = got
                    compared += 1
        plain = results[False, False][0]
        assert results[True, False][0] == plain  # offload_buffers never changes the map
        if (False, True) in results:
            changed += results[False, True][0] != plain
            fallback_warnings += any(FALLBACK_WARNING in w for w in results[False, True][1])
        buffer_warnings += any(BUFFER_WARNING in w for w in results[False, False][1])
        for key in ((True, False), (True, True)):  # offloaded buffers need no GPU room
            assert not any(BUFFER_WARNING in w for w in results.get(key, (None, []))[1])
    # the budgets did reach the cases these options are for
    assert compared >= 150
    assert changed >= 4, changed
    assert fallback_warnings >= 5, fallback_warnings
    if name in ("net", "bert"):  # large buffers
        assert buffer_warnings >= 3, buffer_warnings


@given(gpu=st.integers(0, 60_000), second=st.integers(0, 60_000), cpu=st.integers(0, 200_000),
       split=st.booleans(), fallback=st.booleans())
@settings(max_examples=120, deadline=None)
def test_any_budgets_give_accelerates_map_property(accelerate: Any, gpu: int, second: int,
                                                   cpu: int, split: bool, fallback: bool) -> None:
    budget = {0: gpu, 1: second, "cpu": cpu}
    with pytest.MonkeyPatch.context() as monkeypatch:
        _compare(accelerate, monkeypatch, "net", budget, split, None, False, fallback)


# --- the options, one case each ---------------------------------------------------------------

def _stack() -> Net:
    with init_empty_weights():  # 64-wide blocks of 17 KB, 8-wide blocks of 350 bytes
        return Net((64, 64, 8, 8), (0, 0, 0, 0))


def test_fallback_fills_a_gpu_the_walk_would_leave_empty(accelerate: Any) -> None:
    net = _stack()
    # GPU 0 keeps 17152 bytes free for a large block: the 10240-byte embedding does not fit
    # in the 2848 left, but the 352-byte blocks.2 does
    budget = {0: 20_000, "cpu": 10**6}
    plain = infer_device_map(net, budget, ["Block"])
    with pytest.warns(UserWarning, match="fallback_allocation=True found no module for 1, so it "
                                         "holds no weights: its budget is 300 bytes, and with "
                                         "17152 bytes kept free"):
        filled = infer_device_map(net, {**budget, 1: 300}, ["Block"], fallback_allocation=True)
    assert plain.as_dict() == {"": "cpu"}
    assert filled.as_dict() == {"blocks.2": 0, "blocks.0": "cpu", "blocks.1": "cpu",
                                "blocks.3": "cpu", "embed": "cpu", "head": "cpu"}
    theirs = accelerate.infer_auto_device_map(net, {0: 20_000, 1: 300, "cpu": 10**6},
                                              ["Block"], fallback_allocation=True)
    assert filled.as_dict() == dict(theirs)


def test_fallback_never_takes_a_module_apart_from_its_tie(transformers: Any) -> None:
    """The search reaches the tied ``lm_head`` with its embedding the module that did not fit:
    counted with it, it fits nowhere. (Accelerate raises IndexError here.)"""
    model = _llama(tied=True)
    sizes = module_sizes(layout_of(model))
    budget = {0: sizes["model.embed_tokens"] + 10, "cpu": 10**7}
    with pytest.warns(UserWarning, match="found no module for 0, .* fits in the 10 bytes left"):
        plan = infer_device_map(model, budget, ["LlamaDecoderLayer"], fallback_allocation=True)
    assert plan.as_dict() == {"": "cpu"}


def test_fallback_warns_once_per_device_and_not_for_a_zero_budget() -> None:
    net = _stack()
    with pytest.warns(UserWarning) as caught:
        infer_device_map(net, {0: 10, 1: 0, 2: 20, "cpu": 10**6}, fallback_allocation=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert "for 0," in messages[0] and "budget is 10 bytes" in messages[0]
    assert "for 2," in messages[1]
    assert all("so it holds no weights" in m and "Give it a larger budget" in m for m in messages)


def test_plan_layout_takes_the_fallback_too() -> None:
    layout = layout_of(_stack())
    sizes = module_sizes(layout)
    plan = plan_layout(layout, sizes, {0: 20_000, "cpu": 10**6}, frozenset({"Block"}),
                       fallback_allocation=True)
    assert plan.device_of("blocks.2") == 0


def test_buffers_kept_on_the_gpu_warn_when_no_gpu_has_room() -> None:
    with init_empty_weights():
        net = Net((16, 16), (0, 256))  # blocks.1 holds a 16 KiB buffer
    budget = {0: 3_000, "cpu": 10**6}
    with pytest.warns(UserWarning, match=r"buffers of the modules placed on 'cpu' or 'disk' "
                                         r"\(16384 bytes\) stay on the executing GPU"):
        plan = infer_device_map(net, budget)
    assert plan.device_of("blocks.1.table") == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert infer_device_map(net, budget, offload_buffers=True) == plan
        assert infer_device_map(net, {**budget, 1: 20_000}) != plan  # room on GPU 1
        assert infer_device_map(net, {"cpu": 10**6}).as_dict() == {"": "cpu"}  # no GPU


@pytest.mark.parametrize("call", [
    lambda: infer_device_map(_stack(), {"cpu": 10**6}, offload_buffers=1),
    lambda: infer_device_map(_stack(), {"cpu": 10**6}, fallback_allocation="yes"),
    lambda: plan_layout(layout_of(_stack()), {}, {"cpu": 1}, fallback_allocation=None),
    lambda: dispatch(torch.nn.Linear(2, 2), {"": "cpu"}, offload_buffers="False"),
    lambda: load_checkpoint_and_dispatch(_stack(), "/no/such/checkpoint", offload_buffers=0),
    lambda: load_checkpoint_and_dispatch(_stack(), "/no/such/checkpoint",
                                         fallback_allocation=1.0),
])
def test_switches_that_are_not_bools_are_refused(call: Callable[[], Any]) -> None:
    with pytest.raises(DeviceMapError, match=r"\(\): (offload_buffers|fallback_allocation) "
                                             r"must be True or False, but got .* \(a \w+\)\. "
                                             "Pass "):
        call()


# --- dispatch: where buffers live ------------------------------------------------------------

def _real(widths: tuple[int, ...] = (8, 8, 8)) -> Net:
    torch.manual_seed(0)
    net = Net(widths, (3, 3, 3), (True, False, True)).eval()
    for block in (net.blocks[0], net.blocks[2]):  # the checkpoint's buffers differ from the
        block.table.mul_(5).add_(1)                # constructor's (blocks.1's is not saved)
    return net


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Net, Path]:
    from safetensors.torch import save_file

    net = _real()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(folder / "model.safetensors"))
    return net, folder


def _empty_net() -> Net:
    with init_empty_weights():
        return Net((8, 8, 8), (3, 3, 3), (True, False, True)).eval()


def test_offload_buffers_end_to_end_keeps_buffers_on_disk_and_the_forward(
        checkpoint: tuple[Net, Path], tmp_path: Path) -> None:
    reference, folder = checkpoint
    ids = torch.randint(0, 40, (2, 5))
    want = reference(ids)
    plan = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "disk",
            "head": "cpu"}
    offload = tmp_path / "offload"
    model = load_checkpoint_and_dispatch(_empty_net(), folder, plan, offload_folder=offload,
                                         offload_buffers=True, quiet=True)
    blocks = model.blocks
    # persistent buffers of disk blocks are on disk at rest, written to the offload folder;
    # the non-persistent one (no checkpoint holds it) stays resident, as in Accelerate
    assert blocks[2].table.is_meta and blocks[2].proj.weight.is_meta
    assert not blocks[1].table.is_meta and blocks[1].proj.weight.is_meta
    assert not blocks[0].table.is_meta
    assert sorted(os.listdir(offload)) == ["blocks.2.table.safetensors", "index.json"]
    assert "blocks.2.table" in getattr(model, OFFLOAD_ATTR)
    torch.testing.assert_close(model(ids), want, rtol=0, atol=0)
    assert blocks[2].table.is_meta  # went home after the forward
    torch.testing.assert_close(model(ids), want, rtol=0, atol=0)
    # without the option, the same map keeps every buffer in memory
    kept = load_checkpoint_and_dispatch(_empty_net(), folder, plan, offload_folder=offload,
                                        quiet=True)
    assert not kept.blocks[2].table.is_meta
    torch.testing.assert_close(kept(ids), want, rtol=0, atol=0)
    # and dispatching again without it reads the disk buffer back
    dispatch(model, {"": "cpu"}, offload)
    assert model.blocks[2].table.device.type == "cpu"
    torch.testing.assert_close(model(ids), want, rtol=0, atol=0)


def test_offload_buffers_planned_auto_map_runs(checkpoint: tuple[Net, Path],
                                               tmp_path: Path) -> None:
    reference, folder = checkpoint
    ids = torch.randint(0, 40, (1, 4))
    sizes = module_sizes(layout_of(reference))
    model = load_checkpoint_and_dispatch(
        _empty_net(), folder, "sequential", {"cpu": sizes["embed"] + 2 * sizes["blocks.0"]},
        ["Block"], offload_folder=tmp_path / "off", offload_buffers=True,
        fallback_allocation=True, quiet=True)
    assert "disk" in model.hf_device_map.values()
    torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=0)


def test_disk_buffers_with_offload_buffers_need_an_offload_folder(
        checkpoint: tuple[Net, Path]) -> None:
    _, folder = checkpoint
    with pytest.raises(DeviceMapError, match=r"dispatch\(\): offload_folder must be given when "
                                             r"offload_buffers=True .* 'blocks.0.table'"):
        load_checkpoint_and_dispatch(_empty_net(), folder, {"": "disk"}, offload_buffers=True,
                                     quiet=True)


@pytest.mark.parametrize("offload_buffers", [False, True])
def test_cpu_entries_next_to_an_accelerator_keep_buffers_as_accelerate(
        offload_buffers: bool) -> None:
    """The slot plan for ``"cpu"`` entries when another device executes (the meta device
    stands in for a GPU here: what is resident there ends up on it)."""
    net = _real()
    state = HookState()
    plan = DeviceMap.of({"embed": "cpu", "blocks": "cpu", "head": "cpu"})
    _plan_slots(net, plan, torch.device("meta"), {}, None, offload_buffers, state)
    homes = {f"{key}.{s.leaf}" if key else s.leaf: s.home for key, ss in state.slots.items()
             for s in ss}
    params = {n for n, _ in _real().named_parameters()}
    assert params <= set(homes)  # every weight stays in RAM
    assert all(h.device.type == "cpu" for h in homes.values())
    offloaded = {n for n in homes if n not in params}
    assert offloaded == ({"blocks.0.table", "blocks.2.table"} if offload_buffers else set())
    assert net.blocks[1].table.is_meta  # non-persistent: resident on the executing device
    assert net.blocks[0].table.is_meta != offload_buffers


def test_fallback_with_a_map_nothing_plans_is_refused(tmp_path: Path) -> None:
    for passed, shown in (({"": "cpu"}, "a map"), (None, "None")):
        with init_empty_weights():
            net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        with pytest.raises(DeviceMapError) as err:
            load_checkpoint_and_dispatch(net, tmp_path, passed, fallback_allocation=True)
        text = str(err.value)
        assert "fallback_allocation=True must come with a device_map to plan" in text
        assert f"device_map={shown}" in text and "device_map='auto'" in text


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
