"""The mesh planner (`plan_parallelism`, `check_parallelism`, `distlib plan --mesh`): counts
checked against real transformers models and torch optimizers, bytes against hand arithmetic,
and every refusal."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from distlib.big_model.empty import init_empty_weights
from distlib.cli import main as cli_main
from distlib.errors import ConfigError, PrecisionError, StrategyError
from distlib.topology import Mesh
from distlib.training.plan import ParallelPlan, check_parallelism, plan_parallelism

needs_transformers = pytest.mark.usefixtures("transformers")

# hidden 64, 8 heads of 8 (q: 64 rows), 4 kv heads (k, v: 32 rows), MLP 128, vocabulary 128
TINY: dict[str, Any] = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 8, "num_key_value_heads": 4,
                        "intermediate_size": 128, "vocab_size": 128}
LLAMA_70B: dict[str, Any] = {"model_type": "llama", "hidden_size": 8192,
                             "num_hidden_layers": 80, "num_attention_heads": 64,
                             "num_key_value_heads": 8, "intermediate_size": 28672,
                             "vocab_size": 128256}

# By hand: embed 128*64 = 8192; per layer q 64*64 + k 32*64 + v 32*64 + o 64*64 = 12288,
# gate/up/down 3 * 128*64 = 24576, two norms 128 -> 36992; final norm 64; lm_head 8192.
TINY_PARAMS = 8192 + 2 * 36992 + 64 + 8192  # 90432
TINY_NORMS = 2 * 128 + 64  # replicated on the tp axis
TINY_TENSORS = 1 + 2 * 9 + 1 + 1  # adam keeps one 4-byte step per tensor


def _config(**changes: Any) -> dict[str, Any]:
    return {**TINY, **changes}


# --- counts against real models ----------------------------------------------------------------

@needs_transformers
@pytest.mark.parametrize("kind, changes", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 16}),
    ("mistral", {}),
    ("qwen2", {}),
])
def test_parameter_count_from_a_config_equals_the_real_model(kind: str,
                                                            changes: dict[str, Any]) -> None:
    import transformers

    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
    config_class, model_class = classes[kind]
    sizes = {k: v for k, v in TINY.items() if k != "model_type"}
    config = config_class(**sizes, **changes)
    real = model_class(config)  # real weights: the count torch sees
    expected = sum(p.numel() for p in real.parameters())
    as_dict = {**config.to_dict(), **changes}
    for source in (config, as_dict):
        plan = plan_parallelism(source, Mesh(dp_shard=1))
        assert plan.num_parameters == expected
        assert plan.total_param_bytes == 4 * expected
    # the config's tensors and tp cuts are the model's own, under every mesh
    with init_empty_weights():
        empty = model_class(config)
    for mesh in (Mesh(dp_shard=2, tp=2), Mesh(dp_shard=1, tp=4), Mesh(dp_shard=8)):
        from_config, from_model = plan_parallelism(config, mesh), plan_parallelism(empty, mesh)
        assert from_config.tensors == from_model.tensors
        assert from_config.param_bytes == from_model.param_bytes


def test_a_tied_head_is_counted_once() -> None:
    plan = plan_parallelism(_config(tie_word_embeddings=True), Mesh(dp_shard=1))
    assert plan.num_parameters == TINY_PARAMS - 128 * 64
    assert "lm_head.weight" not in {t.name for t in plan.tensors}


def test_a_70b_llama_config_counts_its_parameters() -> None:
    plan = plan_parallelism(LLAMA_70B, Mesh(dp_shard=8, tp=8), precision="bf16")
    # embed + head 2 * 128256*8192; per layer q,o 2 * 8192^2, k,v 2 * 1024*8192,
    # MLP 3 * 28672*8192, norms 2 * 8192; the final norm 8192
    layer = 2 * 8192**2 + 2 * 1024 * 8192 + 3 * 28672 * 8192 + 2 * 8192
    assert plan.num_parameters == 2 * 128256 * 8192 + 80 * layer + 8192 == 70_553_706_496
    norms = (2 * 80 + 1) * 8192
    assert plan.param_bytes == 4 * ((plan.num_parameters - norms) // 64 + norms // 8)


# --- per-rank bytes by hand ----------------------------------------------------------------------

def test_bytes_for_dp_shard_2_by_tp_2() -> None:
    plan = plan_parallelism(TINY, Mesh(dp_shard=2, tp=2))
    # tp 2 halves all but the norms: embed 64x64, q 32x64, k/v 16x64, o 64x32, gate/up 64x64,
    # down 64x64, lm_head 64x64 -> 45056, + 320 of norms = 45376; every dim 0 is even: / 2
    per_rank = ((TINY_PARAMS - TINY_NORMS) // 2 + TINY_NORMS) // 2
    assert per_rank == 22688
    assert plan.param_bytes == plan.grad_bytes == 4 * 22688 == 90752
    assert plan.optimizer_bytes == 2 * 90752 + 4 * TINY_TENSORS == 181588
    assert plan.rank_bytes == 90752 * 2 + 181588
    assert dict(plan.shard_factors) == {"dp_replicate": 1.0, "dp_shard": 2.0, "cp": 1.0,
                                        "tp": TINY_PARAMS / 45376}
    cuts = {t.name: (t.tp_dim, t.local_shape) for t in plan.tensors}
    assert cuts["model.embed_tokens.weight"] == (0, (64, 64))
    assert cuts["model.layers.0.self_attn.k_proj.weight"] == (0, (16, 64))
    assert cuts["model.layers.0.self_attn.o_proj.weight"] == (1, (64, 32))
    assert cuts["model.layers.1.mlp.down_proj.weight"] == (1, (64, 64))
    assert cuts["model.layers.0.input_layernorm.weight"] == (None, (64,))
    assert cuts["lm_head.weight"] == (0, (64, 64))


def test_bytes_for_tp_4() -> None:
    plan = plan_parallelism(TINY, Mesh(dp_shard=1, tp=4), optimizer="sgd_momentum")
    per_rank = (TINY_PARAMS - TINY_NORMS) // 4 + TINY_NORMS
    assert per_rank == 22848
    assert plan.param_bytes == plan.grad_bytes == 91392
    assert plan.optimizer_bytes == 91392  # one momentum buffer
    assert plan_parallelism(TINY, Mesh(dp_shard=1, tp=4), optimizer="sgd").optimizer_bytes == 0
    adam = plan_parallelism(TINY, Mesh(dp_shard=1, tp=4), optimizer="adamw")
    assert adam.optimizer_bytes == 2 * 91392 + 4 * TINY_TENSORS


def test_bytes_for_dp_8() -> None:
    sharded = plan_parallelism(TINY, Mesh(dp_shard=8))
    assert sharded.param_bytes == 4 * TINY_PARAMS // 8 == 45216  # every dim 0 divides by 8
    replicated = plan_parallelism(TINY, Mesh(dp_replicate=8, dp_shard=1))
    assert replicated.param_bytes == 4 * TINY_PARAMS == 361728
    assert dict(replicated.shard_factors) == {"dp_replicate": 1.0, "dp_shard": 1.0, "cp": 1.0,
                                              "tp": 1.0}
    cp = plan_parallelism(TINY, Mesh(dp_shard=2, cp=4), seq_len=64)
    assert cp.param_bytes == 4 * TINY_PARAMS // 2  # cp replicates


def test_fsdp_pads_dim_0_and_the_held_bytes_add_up() -> None:
    layer = torch.nn.Linear(10, 5)
    plan = plan_parallelism(layer, Mesh(dp_shard=4))
    # weight 5 rows -> 2 per rank (padded), 2 * 10; bias 5 -> 2: 22 floats on every rank
    assert plan.param_bytes == 4 * 22 == 88
    # torch.chunk's split: ranks 0, 1 hold 2 rows, rank 2 holds 1, rank 3 none
    assert [plan.held_param_bytes(r) for r in range(4)] == [88, 88, 44, 0]
    assert sum(plan.held_param_bytes(r) for r in range(4)) == plan.total_param_bytes == 220


def test_a_module_keeps_its_own_dtype() -> None:
    layer = torch.nn.Linear(8, 8).to(torch.bfloat16)
    plan = plan_parallelism(layer, Mesh(dp_shard=1), precision="bf16")
    assert plan.param_bytes == plan.grad_bytes == 2 * 72
    assert plan.optimizer_bytes == 2 * 2 * 72 + 2 * 4
    # mixed precision computes in bf16 over fp32 master weights: no persistent byte changes
    fp32 = plan_parallelism(TINY, Mesh(dp_shard=2), precision="no")
    bf16 = plan_parallelism(TINY, Mesh(dp_shard=2), precision="bf16")
    assert (fp32.param_bytes, fp32.optimizer_bytes) == (bf16.param_bytes, bf16.optimizer_bytes)
    assert bf16.precision == "bf16"


@pytest.mark.parametrize("name, make", [
    ("adamw", lambda ps: torch.optim.AdamW(ps, lr=0.1)),
    ("adam", lambda ps: torch.optim.Adam(ps, lr=0.1)),
    ("sgd_momentum", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1)),
])
def test_optimizer_and_gradient_bytes_equal_torch(name: str, make: Any) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(12, 6), torch.nn.Linear(6, 3),
                                torch.nn.LayerNorm(3))
    optimizer = make(model.parameters())
    model(torch.tensor([1, 2, 3])).sum().backward()
    optimizer.step()
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values()
                for v in s.values() if isinstance(v, torch.Tensor))
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    plan = plan_parallelism(model, Mesh(dp_shard=1), optimizer=name)
    assert plan.optimizer_bytes == state
    assert plan.grad_bytes == grads == plan.param_bytes


# --- a hand-written tp plan -------------------------------------------------------------------

class _MLP(torch.nn.Module):
    def __init__(self, inner: int = 16) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, inner)
        self.norm = torch.nn.LayerNorm(inner)
        self.fc2 = torch.nn.Linear(inner, 8)


def test_a_mapping_plan_with_torch_styles_shards_a_plain_module() -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    for plan_map in ({"fc1": "colwise", "fc2": "rowwise"},
                     {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}):
        plan = plan_parallelism(_MLP(), Mesh(dp_shard=1, tp=2), tp_plan=plan_map)
        cuts = {t.name: (t.tp_dim, t.local_shape) for t in plan.tensors}
        assert cuts == {"fc1.weight": (0, (8, 8)), "fc1.bias": (0, (8,)),
                        "norm.weight": (None, (16,)), "norm.bias": (None, (16,)),
                        "fc2.weight": (1, (8, 8)), "fc2.bias": (None, (8,))}
        assert plan.param_bytes == 4 * (64 + 8 + 32 + 64 + 8)
    assert "every tensor tp shards (3) splits evenly by tp=2" in plan.checks


# --- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, tp, named, not_named", [
    ({"num_attention_heads": 6, "num_key_value_heads": 6, "hidden_size": 96}, 4,
     "num_attention_heads (6) must be divisible by tp (4)", "hidden_size"),
    ({}, 8, "num_key_value_heads (4) must be divisible by tp (8)", "num_attention_heads ("),
    ({"hidden_size": 66, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16}, 4,
     "hidden_size (66) must be divisible by tp (4)", "num_key_value_heads ("),
    ({"intermediate_size": 130}, 4, "intermediate_size (130) must be divisible by tp (4)",
     "vocab_size ("),
    ({"vocab_size": 130}, 4, "vocab_size (130) must be divisible by tp (4)",
     "intermediate_size ("),
])
def test_each_divisibility_is_named(changes: dict[str, Any], tp: int, named: str,
                                    not_named: str) -> None:
    with pytest.raises(StrategyError, match="check_parallelism") as caught:
        check_parallelism(_config(**changes), Mesh(dp_shard=1, tp=tp))
    assert named in str(caught.value) and not_named not in str(caught.value)
    assert "tp sizes this model allows are" in str(caught.value)
    with pytest.raises(StrategyError, match="plan_parallelism"):
        plan_parallelism(_config(**changes), Mesh(dp_shard=1, tp=tp))


def test_heads_are_checked_only_when_attention_is_sharded() -> None:
    config = _config(num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    with pytest.raises(StrategyError) as caught:
        check_parallelism(config, Mesh(dp_shard=1, tp=4),
                          tp_plan={"model.layers.*.self_attn.q_proj": "colwise"})
    assert "num_attention_heads (6)" in str(caught.value)
    assert "num_key_value_heads" not in str(caught.value)
    checks = check_parallelism(config, Mesh(dp_shard=1, tp=4),
                               tp_plan={"model.layers.*.mlp.up_proj": "colwise"})
    assert "intermediate_size 128 % tp=4 == 0" in checks
    assert not any("heads" in c for c in checks)


def test_every_broken_rule_is_named_at_once() -> None:
    with pytest.raises(StrategyError) as caught:
        check_parallelism(TINY, Mesh(dp_shard=1, tp=3))
    text = str(caught.value)
    for name in ("num_attention_heads (8)", "num_key_value_heads (4)", "hidden_size (64)",
                 "intermediate_size (128)", "vocab_size (128)"):
        assert name in text
    assert "allows are 1, 2, 4." in text


def test_seq_len_must_divide_by_twice_cp() -> None:
    with pytest.raises(StrategyError, match=r"seq_len \(6\) must be divisible by 2\*cp \(4\)") as caught:
        check_parallelism(TINY, Mesh(dp_shard=1, cp=2, tp=2), seq_len=6)
    assert "pad the sequence to a multiple of 4" in str(caught.value)
    assert "tp sizes" not in str(caught.value)  # the tp rules hold
    assert "seq_len 8 % (2*cp=4) == 0" in check_parallelism(TINY, Mesh(dp_shard=1, cp=2),
                                                            seq_len=8)
    plan = plan_parallelism(TINY, Mesh(dp_shard=1, cp=2))
    assert plan.unchecked == ("seq_len % (2*cp=4) == 0: no seq_len given",)
    for bad in (0, -4, True, "8"):
        with pytest.raises(ConfigError, match="seq_len must be a positive int"):
            check_parallelism(TINY, Mesh(dp_shard=1, cp=2), seq_len=bad)  # type: ignore[arg-type]


def test_the_world_size_must_be_the_mesh_product() -> None:
    with pytest.raises(ConfigError, match=r"world size 8 for dp_shard=2 x tp=2 \(product 4\)"):
        check_parallelism(TINY, Mesh(dp_shard=2, tp=2), world_size=8)
    with pytest.raises(ConfigError, match=r"world size 8 for dp_shard=-1 x tp=3 \(product 3\)"):
        check_parallelism(TINY, Mesh(tp=3), world_size=8)
    with pytest.raises(ConfigError, match="must give every size when no world_size"):
        check_parallelism(TINY, Mesh(tp=2))
    plan = plan_parallelism(TINY, Mesh(tp=2), world_size=8)
    assert plan.mesh == Mesh(dp_shard=4, tp=2) and plan.checks[0] == "world size 8 = dp_shard=4 x tp=2"
    for bad in (0, -2, True):
        with pytest.raises(ConfigError, match="world_size must be a positive int"):
            check_parallelism(TINY, Mesh(tp=2), world_size=bad)
    with pytest.raises(ConfigError, match="mesh must be a distlib Mesh"):
        check_parallelism(TINY, "dp_shard=2")  # type: ignore[arg-type]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ConfigError, match="optimizer must be one of adamw, adam, sgd"):
        plan_parallelism(TINY, Mesh(dp_shard=1), optimizer="lion")
    with pytest.raises(PrecisionError, match="'fp4'"):
        plan_parallelism(TINY, Mesh(dp_shard=1), precision="fp4")
    with pytest.raises(ConfigError, match=r"model_type='gpt2'.*init_empty_weights"):
        plan_parallelism({**TINY, "model_type": "gpt2"}, Mesh(dp_shard=1))
    with pytest.raises(ConfigError, match="without vocab_size"):
        plan_parallelism({k: v for k, v in TINY.items() if k != "vocab_size"}, Mesh(dp_shard=1))
    with pytest.raises(ConfigError, match=r"must be an nn\.Module or a transformers config"):
        plan_parallelism(42, Mesh(dp_shard=1))


def test_tp_plan_refusals() -> None:
    tp2 = Mesh(dp_shard=1, tp=2)
    with pytest.raises(StrategyError, match="tp_plan='auto' needs a model with its own"):
        check_parallelism(_MLP(), tp2)
    assert check_parallelism(_MLP(), Mesh(dp_shard=2)) == ("world size 2 = dp_shard=2",)
    with pytest.raises(StrategyError, match=r"\['fc9'\] matching none"):
        check_parallelism(_MLP(), tp2, tp_plan={"fc1": "colwise", "fc9": "rowwise"})
    with pytest.raises(StrategyError, match=r"tp_plan\['fc1'\] must be one of colwise"):
        check_parallelism(_MLP(), tp2, tp_plan={"fc1": "diagonal"})
    with pytest.raises(StrategyError,
                       match=r"applies to nn\.Linear and nn\.Embedding.*norm\.weight"):
        check_parallelism(_MLP(), tp2, tp_plan={"norm": "colwise"})
    with pytest.raises(StrategyError, match="must be 'auto' or a mapping"):
        check_parallelism(_MLP(), tp2, tp_plan=["fc1"])
    with pytest.raises(StrategyError, match=r"must be 'auto' or a mapping.*None"):
        check_parallelism(_MLP(), tp2, tp_plan=None)
    assert check_parallelism(_MLP(), Mesh(dp_shard=2), tp_plan=None) == (
        "world size 2 = dp_shard=2",)
    with pytest.raises(StrategyError, match=r"fc1.weight dim 0 \(6\) must be divisible by tp "
                                            r"\(4\); fc1.bias dim 0 \(6\).*allows are 1, 2, 3, 6\."):
        check_parallelism(_MLP(inner=6), Mesh(dp_shard=1, tp=4), tp_plan={"fc1": "colwise"})


def test_the_plan_is_a_frozen_value() -> None:
    plan = plan_parallelism(TINY, Mesh(dp_shard=2, tp=2))
    assert plan == plan_parallelism(TINY, Mesh(dp_shard=2, tp=2))
    assert hash(plan) == hash(plan_parallelism(TINY, Mesh(dp_shard=2, tp=2)))
    with pytest.raises(AttributeError):
        plan.param_bytes = 0  # type: ignore[misc]
    assert repr(plan).startswith("ParallelPlan(mesh=Mesh(dp_replicate=1, dp_shard=2, cp=1, tp=2)")
    assert "param_bytes=90752" in repr(plan) and "TensorPlan" not in repr(plan)
    with pytest.raises(ConfigError, match="must be ints >= 0"):
        ParallelPlan(mesh=plan.mesh, precision=plan.precision, optimizer="sgd",
                     num_parameters=-1, total_param_bytes=0, param_bytes=0, grad_bytes=0,
                     optimizer_bytes=0, shard_factors=(), tensors=(), checks=())


# --- distlib plan --mesh --------------------------------------------------------------------------

def test_plan_command_prints_the_mesh_plan(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    assert cli_main(["plan", "--mesh", "dp_shard=2,tp=2", "--model-config", str(path)]) == 0
    text = capsys.readouterr().out
    assert "mesh: dp_shard=2 x tp=2 (4 ranks)" in text and "90,432 parameters" in text
    assert "parameters         90,752" in text and "optimizer         181,588" in text
    assert "ok  num_key_value_heads 4 % tp=2 == 0" in text
    assert cli_main(["plan", "--mesh", "tp=4", "--model-config", str(tmp_path), "--json",
                     "--num-processes", "8", "--precision", "bf16", "--optimizer", "sgd",
                     "--seq-len", "128"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"] == {"dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 4}
    assert out["per_rank_bytes"]["parameters"] == 4 * -(-((TINY_PARAMS - TINY_NORMS) // 4
                                                          + TINY_NORMS) // 2)
    assert out["per_rank_bytes"]["optimizer"] == 0 and out["precision"] == "bf16"


def test_plan_command_refusals(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    cases = [
        (["--mesh", "tp=3", "--model-config", str(path), "--num-processes", "3"],
         "num_attention_heads (8) must be divisible by tp (3)"),
        (["--mesh", "tp=2", "--model-config", str(path), "--max-memory", "cpu=1GB"],
         "--max-memory must not be given with --mesh"),
        (["--mesh", "tp=2"], "must be given --model-config CFG and no CHECKPOINT"),
        ([str(tmp_path), "--mesh", "tp=2", "--model-config", str(path)],
         "CHECKPOINT='"),
        ([str(tmp_path), "--seq-len", "8"], "--seq-len must not be given without --mesh"),
        ([], "must be given a CHECKPOINT (a device map) or --mesh"),
        (["--mesh", "tp=2", "--model-config", str(tmp_path / "missing.json")],
         "--model-config must be a transformers config.json"),
        (["--mesh", "tp=2", "--model-config", str(path), "--tp-plan", "{oops"],
         "--tp-plan must be a JSON object"),
        (["--mesh", "pp=2", "--model-config", str(path)], "--mesh must be AXIS=SIZE pairs"),
    ]
    for argv, message in cases:
        assert cli_main(["plan", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv


@needs_transformers
def test_plan_command_builds_other_layouts_empty(tmp_path: Any,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                     n_positions=64)
    config.save_pretrained(tmp_path)
    assert cli_main(["plan", "--mesh", "dp_shard=2", "--model-config", str(tmp_path),
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    real = transformers.GPT2LMHeadModel(config)
    assert out["num_parameters"] == sum(p.numel() for p in real.parameters())
