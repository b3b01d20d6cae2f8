"""A model spread over cuda:0, cpu and disk computes what the plain model computes (needs CUDA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

transformers = pytest.importorskip("transformers")

from distlib.big_model import (  # noqa: E402
    DeviceMap,
    infer_device_map,
    init_empty_weights,
    load_checkpoint_and_dispatch,
)

VOCAB = 101


def _config() -> Any:
    return transformers.LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    vocab_size=VOCAB, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config()).eval()
    folder = tmp_path_factory.mktemp("llama_gpu")
    model.save_pretrained(folder, max_shard_size="100KB")
    return model.to("cuda:0"), folder


def _empty() -> Any:
    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(_config()).eval()


def _check(reference: Any, model: Any) -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 7), device="cuda:0")
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    assert got.device == ids.device
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(reference.generate(ids, **kwargs), model.generate(ids, **kwargs))


def test_cuda_cpu_disk_map_matches_the_plain_model(saved: tuple[Any, Path]) -> None:
    reference, folder = saved
    plan = DeviceMap.of({"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
                         "model.layers.1": "cpu", "model.layers.2": "disk",
                         "model.layers.3": "cpu", "model.norm": 0, "lm_head": 0})
    model = load_checkpoint_and_dispatch(_empty(), folder, plan, quiet=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "cpu"
    assert model.model.layers[2].mlp.up_proj.weight.is_meta
    assert model.model.rotary_emb.inv_freq.device.type == "cuda"
    _check(reference, model)
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "cpu"  # went home
    assert model.model.layers[2].mlp.up_proj.weight.is_meta


def test_planned_map_with_a_small_gpu_budget(saved: tuple[Any, Path], tmp_path: Path) -> None:
    reference, folder = saved
    empty = _empty()
    total = sum(p.numel() * 4 for p in empty.parameters())
    budget = {0: total // 2, "cpu": total // 2}  # embed on 0, a layer on cpu, the rest disk
    plan = infer_device_map(empty, budget, ["LlamaDecoderLayer"])
    assert set(plan.devices) == {0, "cpu", "disk"}
    model = load_checkpoint_and_dispatch(empty, folder, plan, offload_folder=tmp_path, quiet=True)
    _check(reference, model)


def test_half_precision_on_gpu_with_offload(saved: tuple[Any, Path], tmp_path: Path) -> None:
    reference, folder = saved
    half = transformers.AutoModelForCausalLM.from_config(_config()).eval()
    half.load_state_dict({k: v.cpu() for k, v in reference.state_dict().items()})
    for param in half.parameters():
        param.data = param.data.to(torch.float16)
    half = half.to("cuda:0")
    plan = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers": "disk",
            "model.norm": 0, "lm_head": 0}
    model = load_checkpoint_and_dispatch(_empty(), folder, plan, dtype=torch.float16,
                                         offload_folder=tmp_path, quiet=True)
    ids = torch.randint(0, VOCAB, (1, 5), device="cuda:0")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, half(ids).logits, rtol=1e-3, atol=1e-3)
