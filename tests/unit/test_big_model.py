"""Empty init, sizes and the device-map planner (one process, no hardware needed)."""

from __future__ import annotations

import json
import logging
import random
import warnings
from typing import Any

import pytest
import torch

from distlib.big_model import device_map as device_map_module
from distlib.big_model.device_map import DeviceMap, infer_device_map, normalize_budgets
from distlib.big_model.empty import init_empty_weights, init_on_device
from distlib.big_model.sizes import layout_of, module_sizes, parse_size
from distlib.cli import main as cli_main
from distlib.cli.plan import parse_max_memory
from distlib.errors import DeviceMapError

# Tests that build transformers' models are skipped without it (the conftest fixture); the
# rest of the file needs no transformers.
needs_transformers = pytest.mark.usefixtures("transformers")


def _gpt2_config() -> Any:
    import transformers

    return transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=100, n_positions=64)


def _llama_config(layers: int = 4, **extra: Any) -> Any:
    import transformers

    return transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64,
                                    num_attention_heads=2, num_key_value_heads=1,
                                    vocab_size=100, **extra)


def _empty(config: Any) -> Any:
    import transformers

    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config)


# --- empty init -------------------------------------------------------------------------------

def test_empty_init_puts_parameters_on_meta_and_keeps_buffers_real(transformers: Any) -> None:
    model = _empty(_llama_config(tie_word_embeddings=True))
    assert all(p.is_meta for p in model.parameters())
    inv_freq = model.model.rotary_emb.inv_freq
    assert not inv_freq.is_meta
    real = transformers.AutoModelForCausalLM.from_config(_llama_config(tie_word_embeddings=True))
    torch.testing.assert_close(inv_freq, real.model.rotary_emb.inv_freq)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_include_buffers_puts_buffers_on_meta_too() -> None:
    with init_empty_weights(include_buffers=True):
        model = torch.nn.BatchNorm1d(4)
    assert model.running_mean.is_meta and model.weight.is_meta


def test_init_on_device_restores_torch_even_after_an_error() -> None:
    original = torch.nn.Module.register_parameter
    with pytest.raises(RuntimeError, match="boom"), init_on_device("meta"):
        raise RuntimeError("boom")
    assert torch.nn.Module.register_parameter is original
    with init_on_device("cpu"):
        layer = torch.nn.Linear(2, 2)
    assert layer.weight.device.type == "cpu"
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


# --- sizes ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("10GiB", 10 * 2**30), ("10GB", 10 * 10**9), ("500MB", 500 * 10**6), ("1.5KiB", 1536),
    (123, 123), ("7", 7), ("2 mib", 2 * 2**20)])
def test_parse_size(text: Any, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["ten GB", "-1GB", -5, "5XB", True, None])
def test_parse_size_refuses_garbage(bad: Any) -> None:
    with pytest.raises(DeviceMapError, match="memory size"):
        parse_size(bad)


@needs_transformers
def test_module_sizes_count_tied_once_and_shrink_to_the_dtype() -> None:
    model = _empty(_gpt2_config())
    layout = layout_of(model)
    sizes = module_sizes(layout)
    unique = {id(p): p.numel() * 4 for p in model.parameters()}
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert sizes[""] == sum(unique.values()) + buffers
    assert sizes.get("lm_head", 0) == 0  # its weight is the embedding's, counted there
    half = module_sizes(layout, "float16")
    assert half["transformer.h.0"] * 2 == sizes["transformer.h.0"]


# --- the planner ------------------------------------------------------------------------------

@needs_transformers
def test_maps_equal_accelerates_on_gpt2_and_llama() -> None:
    accelerate = pytest.importorskip("accelerate.utils")
    rng = random.Random(0)
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    cases = 0
    for config, no_split in ((_gpt2_config(), ["GPT2Block"]), (_llama_config(), ["LlamaDecoderLayer"]),
                             (_llama_config(tie_word_embeddings=True), ["LlamaDecoderLayer"])):
        model = _empty(config)
        total = sum(p.numel() * 4 for p in model.parameters())
        for _ in range(25):
            gpus = rng.randint(0, 3)
            budget: dict[Any, int] = {i: rng.randint(0, total // max(gpus, 1)) for i in range(gpus)}
            if rng.random() < 0.8:
                budget["cpu"] = rng.randint(0, total)
            split = rng.choice([[], no_split])
            dtype = rng.choice([None, torch.float16])
            mode = rng.choice(["sequential", "balanced", "balanced_low_0"])
            theirs_budget = dict(budget)
            if mode != "sequential":
                theirs_budget = accelerate.get_balanced_memory(
                    model, dict(budget), no_split_module_classes=split, dtype=dtype,
                    low_zero=mode == "balanced_low_0")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = accelerate.infer_auto_device_map(model, dict(theirs_budget), split, dtype)
                ours = infer_device_map(model, budget, split, dtype, mode=mode)
            assert ours.as_dict() == dict(theirs), (budget, split, dtype, mode)
            cases += 1
    assert cases == 75


@needs_transformers
def test_explicit_budgets_never_ask_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden() -> None:
        raise AssertionError("asked the hardware")

    monkeypatch.setattr(device_map_module, "hardware_budgets", forbidden)
    model = _empty(_llama_config())
    plan = infer_device_map(model, {0: "70KB", 1: "70KB", "cpu": "1GB"}, ["LlamaDecoderLayer"])
    assert set(plan.devices) == {0, 1, "cpu"}
    assert plan.as_dict()["model.embed_tokens"] == 0


@needs_transformers
def test_no_cpu_budget_warns_that_the_rest_goes_to_disk() -> None:
    model = _empty(_llama_config())
    with pytest.warns(UserWarning, match="names no 'cpu'"):
        plan = infer_device_map(model, {0: "40KB"}, ["LlamaDecoderLayer"])
    assert "disk" in plan.devices and "cpu" not in plan.devices


def test_hardware_budgets_when_max_memory_is_none() -> None:
    budgets = device_map_module.hardware_budgets()
    assert budgets.get("cpu", 0) > 0 or budgets.get("mps", 0) > 0
    plan = infer_device_map(torch.nn.Linear(4, 4))
    assert plan.as_dict() == {"": "cpu"} if not torch.cuda.is_available() else plan.devices


@needs_transformers
def test_impossible_budget_without_disk_says_what_is_needed() -> None:
    model = _empty(_llama_config())
    with pytest.raises(DeviceMapError, match=r"model of \d+ bytes.*fits on no device"):
        infer_device_map(model, {"cpu": "10KB", "disk": 0}, ["LlamaDecoderLayer"])


@pytest.mark.parametrize("budget", [{"gpu0": 10}, {"cpu": "lots"}, {-1: 5}])
def test_bad_budgets_are_errors(budget: Any) -> None:
    with pytest.raises(DeviceMapError, match="max_memory"):
        infer_device_map(torch.nn.Linear(2, 2), budget)


def test_bad_mode_is_an_error() -> None:
    with pytest.raises(DeviceMapError, match="mode must be one of"):
        infer_device_map(torch.nn.Linear(2, 2), {"cpu": 100}, mode="fastest")


def test_normalize_budgets_orders_gpus_then_cpu_then_disk() -> None:
    budgets = normalize_budgets({"disk": 1, "cpu": 2, "cuda:1": 3, 0: "1KB"}, source="t")
    assert list(budgets) == [0, 1, "cpu", "disk"]


def test_device_map_value() -> None:
    plan = DeviceMap.of({"a": "cuda:1", "a.b": "cpu", "": "disk"})
    assert plan.device_of("a.b.c") == "cpu" and plan.device_of("a.x") == 1
    assert plan.device_of("z") == "disk" and plan.key_of("a.b.c") == "a.b"
    assert plan == DeviceMap.of(plan.as_dict()) and hash(plan) == hash(DeviceMap.of(plan))
    with pytest.raises(DeviceMapError):
        DeviceMap.of({"a": "tpu"})


@needs_transformers
def test_balanced_spreads_over_gpus_and_low_0_spares_gpu_0() -> None:
    model = _empty(_llama_config(8))
    budget = {0: "1GB", 1: "1GB", "cpu": "1GB"}
    balanced = infer_device_map(model, budget, ["LlamaDecoderLayer"], mode="balanced")
    sequential = infer_device_map(model, budget, ["LlamaDecoderLayer"])
    low = infer_device_map(model, budget, ["LlamaDecoderLayer"], mode="balanced_low_0")
    assert set(balanced.devices) == {0, 1} and sequential.devices == (0,)
    on_zero = [n for n, d in low.entries if d == 0]
    assert len(on_zero) < len([n for n, d in balanced.entries if d == 0])


# --- distlib plan -----------------------------------------------------------------------------

def test_parse_max_memory() -> None:
    assert parse_max_memory("cuda:0=20GiB, cpu=30GiB") == {"cuda:0": "20GiB", "cpu": "30GiB"}
    with pytest.raises(DeviceMapError, match="--max-memory"):
        parse_max_memory("cuda:0:20GiB")


def test_plan_command_reads_headers_only(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.layers.{i}.w": torch.zeros(1000) for i in range(12)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    code = cli_main(["plan", str(tmp_path), "--max-memory", "cuda:0=9KB,cpu=12KB",
                     "--no-split", "model.layers.*", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    devices = list(out["device_map"].values())
    assert devices[0] == 0 and devices[-1] == "disk" and "cpu" in devices
    assert list(out["device_map"])[:2] == ["model.layers.0", "model.layers.1"]  # numeric order
    assert cli_main(["plan", str(tmp_path), "--max-memory", "cpu=1GB", "--dtype", "bf16"]) == 0
    text = capsys.readouterr().out
    assert "\nmodel   cpu\n" in text and "23.44 KiB" in text
