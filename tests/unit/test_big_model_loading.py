"""Loading checkpoints and running dispatched models: tiny GPT-2 and Llama, cpu + disk maps."""

from __future__ import annotations

import importlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from distlib.big_model.device_map import DeviceMap, infer_device_map
from distlib.big_model.empty import init_empty_weights
from distlib.big_model.files import checkpoint_files
from distlib.big_model.loading import load_checkpoint
from distlib.big_model.offload import OFFLOAD_ATTR
from distlib.big_model.placement import dispatch, load_checkpoint_and_dispatch
from distlib.errors import CheckpointError, DeviceMapError
from distlib.testing import fake_env

VOCAB = 101


def _config(kind: str, **extra: Any) -> Any:
    import transformers

    if kind == "gpt2":
        return transformers.GPT2Config(**{"n_layer": 3, "n_embd": 32, "n_head": 2,
                                          "vocab_size": VOCAB, "n_positions": 64, **extra})
    return transformers.LlamaConfig(**{"num_hidden_layers": 3, "hidden_size": 32,
                                       "intermediate_size": 64, "num_attention_heads": 2,
                                       "num_key_value_heads": 1, "vocab_size": VOCAB, **extra})


def _save_bin_sharded(model: Any, folder: Path) -> None:
    state = model.state_dict()
    names = list(state)
    half = len(names) // 2
    weight_map = {}
    for index, part in enumerate((names[:half], names[half:])):
        file = f"pytorch_model-{index + 1:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture(scope="module")
def saved(transformers: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Reference models with random weights, saved as sharded safetensors and as .bin.

    The tests that use them need transformers (they are skipped without it); the rest of the
    file does not.
    """
    out: dict[str, Any] = {}
    for kind, extra in (("gpt2", {}), ("llama", {}), ("llama_tied", {"tie_word_embeddings": True})):
        torch.manual_seed(0)
        config = _config(kind.split("_")[0], **extra)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        safe = tmp_path_factory.mktemp(f"{kind}_safe")
        model.save_pretrained(safe, max_shard_size="60KB")
        binary = tmp_path_factory.mktemp(f"{kind}_bin")
        if kind == "llama":
            _save_bin_sharded(model, binary)
        else:
            torch.save(model.state_dict(), binary / "pytorch_model.bin")
        out[kind] = {"config": config, "model": model, "safe": safe, "bin": binary}
    return out


def _empty(config: Any) -> Any:
    import transformers

    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config).eval()


def _cpu_disk_map(model: Any) -> DeviceMap:
    total = sum(p.numel() * 4 for p in model.parameters())
    plan = infer_device_map(model, {"cpu": total // 2}, model._no_split_modules)
    assert set(plan.devices) == {"cpu", "disk"}
    return plan


def _same_outputs(reference: Any, model: Any, exact: bool = True) -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    if exact:
        assert torch.equal(want, got)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(reference.generate(ids, **kwargs), model.generate(ids, **kwargs))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("fmt", ["safe", "bin"])
def test_cpu_disk_dispatch_matches_the_plain_model(saved: dict[str, Any], kind: str, fmt: str,
                                                   tmp_path: Path) -> None:
    case = saved[kind]
    model = _empty(case["config"])
    plan = _cpu_disk_map(model)
    folder = tmp_path / "offload" if fmt == "bin" else None
    model = load_checkpoint_and_dispatch(model, case[fmt], plan, offload_folder=folder, quiet=True)
    assert model.hf_device_map == plan.as_dict()
    _same_outputs(case["model"], model)
    on_disk = [n for n, p in model.named_parameters() if p.is_meta]
    assert on_disk and all(not p.is_meta for n, p in model.named_parameters()
                           if plan.device_of(n) == "cpu")
    sources = getattr(model, OFFLOAD_ATTR)
    roots = {os.path.dirname(s.file) for s in sources.values()}
    assert roots == ({str(case["safe"])} if fmt == "safe" else {str(folder)})


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_dtype_conversion_matches_a_converted_plain_model(saved: dict[str, Any], kind: str,
                                                          tmp_path: Path, transformers: Any) -> None:
    case = saved[kind]
    reference = transformers.AutoModelForCausalLM.from_config(case["config"]).eval()
    reference.load_state_dict(case["model"].state_dict())
    for param in reference.parameters():
        param.data = param.data.to(torch.bfloat16)
    model = _empty(case["config"])
    plan = _cpu_disk_map(model)
    model = load_checkpoint_and_dispatch(model, case["safe"], plan, dtype="bf16",
                                         offload_folder=tmp_path, quiet=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert any(f.endswith(".safetensors") for f in os.listdir(tmp_path))
    _same_outputs(reference, model)


def test_tied_weights_and_rotary_buffers_survive_load_and_dispatch(saved: dict[str, Any]) -> None:
    case = saved["llama_tied"]
    with open(os.path.join(case["safe"], "model.safetensors.index.json")) as handle:
        assert "lm_head.weight" not in json.load(handle)["weight_map"]  # stored once
    model = _empty(case["config"])
    plan = DeviceMap.of({"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu",
                         "model.rotary_emb": "cpu", "lm_head": "disk"})
    model = load_checkpoint_and_dispatch(model, case["safe"], plan, quiet=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.model.rotary_emb.inv_freq,
                               case["model"].model.rotary_emb.inv_freq, rtol=0, atol=0)
    _same_outputs(case["model"], model)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_auto_map_with_cpu_budget_and_tied_planning(saved: dict[str, Any]) -> None:
    case = saved["gpt2"]
    model = _empty(case["config"])
    model = load_checkpoint_and_dispatch(model, case["safe"], "auto",
                                         max_memory={"cpu": "120KB"}, quiet=True)
    plan = DeviceMap.of(model.hf_device_map)
    assert len(plan.devices) == 2
    assert plan.device_of("lm_head.weight") == plan.device_of("transformer.wte.weight")
    assert model.lm_head.weight is model.transformer.wte.weight
    _same_outputs(case["model"], model)


def test_prefetch_reads_ahead_the_next_offloaded_module(saved: dict[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    dispatch_module = importlib.import_module("distlib.big_model.hooks")
    original = dispatch_module._read_ahead

    def spy(runtime: Any, key: str) -> None:
        calls.append(key)
        original(runtime, key)

    monkeypatch.setattr(dispatch_module, "_read_ahead", spy)
    case = saved["llama"]
    model = load_checkpoint_and_dispatch(_empty(case["config"]), case["safe"], {"": "disk"},
                                         quiet=True)
    ran: list[str] = []
    for name, module in model.named_modules():
        if module._parameters:
            module.register_forward_pre_hook(lambda *_, name=name: ran.append(name))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # learns the order the modules run in
        ran.clear()
        calls.clear()
        model(torch.tensor([[1, 2, 3]]))
    assert ran[1] == "model.layers.0.input_layernorm"  # runs before self_attn, defined after
    assert calls == ran  # the root reads the first module ahead, each module the next
    assert all(p.is_meta for p in model.parameters())  # sent home after the forward


def test_keep_in_fp32_modules_stay_float32(saved: dict[str, Any]) -> None:
    case = saved["llama"]
    model = _empty(case["config"])
    load_checkpoint(model, case["safe"], dtype=torch.float16, keep_in_fp32_modules=["norm"])
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float16
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float16


def test_dispatch_of_a_real_model_writes_disk_weights_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    want = net(x)
    dispatch(net, {"0": "cpu", "1": "cpu", "2": "disk"}, offload_folder=tmp_path)
    assert net[2].weight.is_meta and sorted(os.listdir(tmp_path)) == [
        "2.bias.safetensors", "2.weight.safetensors", "index.json"]
    assert torch.equal(net(x), want)
    dispatch(net, {"0": "cpu", "1": "cpu", "2": "disk"}, offload_folder=tmp_path)
    assert len(net[2]._forward_pre_hooks) == 1  # a second dispatch replaces the hooks
    with pytest.raises(DeviceMapError, match="every parameter"):
        dispatch(torch.nn.Sequential(torch.nn.Linear(2, 2)), {"1": "cpu"})


def test_progress_bar_on_main_rank_only(saved: dict[str, Any],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    case = saved["gpt2"]
    for rank, shown in ((1, False), (0, True)):
        env = fake_env(rank, 2)
        load_checkpoint_and_dispatch(_empty(case["config"]), case["safe"], {"": "cpu"}, env=env,
                                     progress=True)
        err = capsys.readouterr().err
        assert ("loading weights" in err and "B/s" in err) is shown
    load_checkpoint_and_dispatch(_empty(case["config"]), case["safe"], {"": "cpu"},
                                 progress=True, quiet=True)
    assert capsys.readouterr().err == ""


def _final_frames(err: str, desc: str) -> list[str]:
    return [line.split("\r")[-1] for line in err.split("\n") if f"{desc}:" in line]


def test_load_checkpoint_shows_progress_in_bytes(saved: dict[str, Any],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from tqdm import tqdm

    case = saved["gpt2"]
    files = checkpoint_files(case["safe"])
    assert len(files) > 1  # sharded: one bar over every file
    total = sum(os.path.getsize(f) for f in files) - sum(
        8 + int.from_bytes(Path(f).read_bytes()[:8], "little") for f in files)  # less headers
    model = load_checkpoint(_empty(case["config"]), case["safe"], progress=True)
    frames = _final_frames(capsys.readouterr().err, "loading weights")
    shown = tqdm.format_sizeof(total)
    assert len(frames) == 1 and "100%|" in frames[0] and f"{shown}B/{shown}B" in frames[0], frames
    assert torch.equal(model.transformer.wte.weight, case["model"].transformer.wte.weight)
    for kwargs in ({"progress": True, "env": fake_env(1, 2)},  # another rank: never
                   {"progress": False}, {}):  # off; auto with stderr not a terminal
        load_checkpoint(_empty(case["config"]), case["safe"], **kwargs)
        assert capsys.readouterr().err == "", kwargs
    ticks: list[int] = []
    load_checkpoint(_empty(case["config"]), case["bin"], progress=ticks.append)  # a callback
    assert ticks == [1] * len(case["model"].state_dict())  # one call per tensor, as before


def test_auto_progress_asks_the_launch_variables_for_the_rank(
        saved: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from distlib import _progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(_progress, "AUTO_DELAY_S", 0.0)  # however short the load
    case = saved["gpt2"]
    for rank, shown in (("1", False), ("0", True)):
        err = Terminal()
        monkeypatch.setattr("sys.stderr", err)
        for name, value in (("RANK", rank), ("WORLD_SIZE", "2"), ("LOCAL_RANK", rank),
                            ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29400")):
            monkeypatch.setenv(name, value)
        load_checkpoint(_empty(case["config"]), case["safe"])
        assert ("loading weights: 100%" in err.getvalue()) is shown, (rank, err.getvalue())


def test_a_progress_that_is_not_a_switch_is_refused(saved: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match=r"load_checkpoint\(\): progress must be True, False or "
                                        r"None .* but got a str"):
        load_checkpoint(_empty(saved["gpt2"]["config"]), saved["gpt2"]["safe"], progress="yes")


# --- bad input ----------------------------------------------------------------------------------

def test_checkpoint_of_another_model_is_refused_by_name_and_shape(saved: dict[str, Any]) -> None:
    model = _empty(saved["llama"]["config"])
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: .*\[101, 32\]") as info:
        load_checkpoint(model, saved["gpt2"]["safe"])
    assert "transformer.h.0.attn.c_attn.weight" in str(info.value)
    wider = _empty(_config("llama", hidden_size=48))
    with pytest.raises(CheckpointError, match=r"different shapes: .*checkpoint \[101, 32\] vs model "
                                              r"\[101, 48\]"):
        load_checkpoint(wider, saved["llama"]["safe"])


def test_truncated_safetensors_names_the_file(saved: dict[str, Any], tmp_path: Path) -> None:
    source = checkpoint_files(saved["gpt2"]["safe"])[0]
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(Path(source).read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{broken}.*truncated"):
        load_checkpoint(_empty(saved["gpt2"]["config"]), broken)
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(_empty(saved["gpt2"]["config"]), broken)


class _Payload:
    def __reduce__(self) -> Any:
        return (os.getcwd, ())


def test_bin_with_arbitrary_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.ones(2, 2), "evil": _Payload()}, path)
    with pytest.raises(CheckpointError, match=r"only tensors.*never unpickles"):
        load_checkpoint(torch.nn.Linear(2, 2), path)
    path.write_bytes(pickle.dumps({"weight": _Payload()}))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(torch.nn.Linear(2, 2), path)
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(torch.nn.Linear(2, 2), path)


def test_impossible_budget_and_missing_offload_folder(saved: dict[str, Any]) -> None:
    case = saved["llama"]
    with pytest.raises(DeviceMapError, match="fits on no device"):
        load_checkpoint_and_dispatch(_empty(case["config"]), case["safe"], "sequential",
                                     max_memory={"cpu": "10KB", "disk": 0}, quiet=True)
    with pytest.raises(CheckpointError, match="offload_folder must be given"):
        load_checkpoint_and_dispatch(_empty(case["config"]), case["safe"], {"": "disk"},
                                     dtype=torch.float16, quiet=True)
    with pytest.raises(CheckpointError, match=r"must be a \.safetensors"):
        load_checkpoint(_empty(case["config"]), Path(case["safe"]) / "nothing-here")


def test_folder_prefers_safetensors_over_bin(saved: dict[str, Any], tmp_path: Path) -> None:
    case = saved["gpt2"]
    for source in (case["safe"], case["bin"]):
        for name in os.listdir(source):
            (tmp_path / name).write_bytes((Path(source) / name).read_bytes())
    files = checkpoint_files(tmp_path)
    assert files and all(f.endswith(".safetensors") for f in files)


def test_cpu_weights_map_the_file_copy_on_write(saved: dict[str, Any]) -> None:
    case = saved["gpt2"]
    first = load_checkpoint(_empty(case["config"]), case["safe"])
    with torch.no_grad():
        first.transformer.h[0].mlp.c_fc.weight.add_(1.0)  # private to this model
    second = load_checkpoint(_empty(case["config"]), case["safe"])
    copied = load_checkpoint(_empty(case["config"]), case["safe"], copy=True)
    want = case["model"].transformer.h[0].mlp.c_fc.weight
    assert torch.equal(second.transformer.h[0].mlp.c_fc.weight, want)
    assert torch.equal(copied.transformer.h[0].mlp.c_fc.weight, want)
    assert torch.equal(first.transformer.h[0].mlp.c_fc.weight, want + 1.0)


def _generate_offloaded(env: Any, folder: str, config: Any, prompts: list[list[int]]) -> Any:
    """A user's script on each rank: plan with a cpu budget, load, dispatch, greedy generate."""
    import transformers

    from distlib import init_empty_weights as empty_init
    from distlib import load_checkpoint_and_dispatch as load
    from distlib import split_between_processes

    with empty_init():
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    total = sum(p.numel() * 4 for p in model.parameters())
    model = load(model, folder, "auto", max_memory={"cpu": total // 3}, quiet=True)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with split_between_processes(prompts, env) as mine, torch.no_grad():
        out = [model.generate(torch.tensor([p]), **kwargs)[0].tolist() for p in mine]
    return {"tokens": out, "disk": sorted(k for k, d in model.hf_device_map.items()
                                          if d == "disk")}


@pytest.mark.multiprocess
def test_offloaded_generation_in_launched_ranks_is_token_identical(saved: dict[str, Any]) -> None:
    from distlib.testing import spawn

    case = saved["llama"]
    prompts = [[1, 5, 9, 2], [7, 7, 3, 4], [11, 2, 60, 8], [3, 1, 4, 1]]
    result = spawn(_generate_offloaded, str(case["safe"]), case["config"], prompts,
                   world_size=2, timeout_s=240)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = [case["model"].generate(torch.tensor([p]), **kwargs)[0].tolist() for p in prompts]
    assert result[0]["tokens"] + result[1]["tokens"] == want
    assert result[0]["disk"] and result[0]["disk"] == result[1]["disk"]  # layers ran from disk
