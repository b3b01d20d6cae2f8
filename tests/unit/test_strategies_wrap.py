"""wrap / unwrap for every strategy in one process (FSDP2 and DeepSpeed in a 1-rank group)."""

from __future__ import annotations

import pickle
import re
from typing import Any

import pytest
import torch
import torch._dynamo  # its import sets TORCHINDUCTOR_CACHE_DIR; do it before the leak check
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

import distlib as dl
from distlib.errors import ConfigError, PrecisionError, StrategyError
from distlib.testing import fake_env
from distlib.topology import Mesh
from distlib.training import fsdp as fsdp_module
from distlib.training.deepspeed import plan_config
from distlib.training.fsdp import plan_units
from distlib.training.tp import plan_tensor_parallel
from tests.models import net, train, weights


def _net() -> torch.nn.Module:
    return net(8, 8, 8, 2)


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
    return [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]


def _run(strategy: object, precision: str = "no", steps: int = 2) -> torch.nn.Module:
    """Wrap this file's net with ``strategy`` and train it on `_data` (SGD, StepLR, clip 0.5)."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model, opt, sched = dl.wrap(model, strategy, env=dl.Env(precision=precision),
                                optimizer=opt, scheduler=sched)
    train([(model, opt, sched)], _data(), steps=steps, clip=0.5)
    return model


def test_wrap_returns_what_was_passed() -> None:
    model = torch.nn.Linear(2, 2)
    assert dl.wrap(model, dl.Env()) is model
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    out = dl.wrap(torch.nn.Linear(2, 2), dl.Env(), optimizer=opt)
    assert isinstance(out, tuple) and out[1] is opt
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    assert len(dl.wrap(torch.nn.Linear(2, 2), dl.Env(), optimizer=opt, scheduler=sched)) == 3


def test_wrap_errors_teach() -> None:
    model = dl.wrap(torch.nn.Linear(2, 2), dl.Env())
    with pytest.raises(StrategyError, match="must not be wrapped already"):
        dl.wrap(model, dl.Env())
    with pytest.raises(StrategyError, match="env must be passed once"):
        dl.wrap(torch.nn.Linear(2, 2), dl.Env(), env=dl.Env())
    with pytest.raises(StrategyError, match="env_or_strategy must be"):
        dl.wrap(torch.nn.Linear(2, 2), 3, env=dl.Env())
    with pytest.raises(StrategyError, match="compile must only have the keys"):
        dl.wrap(torch.nn.Linear(2, 2), dl.Env(), compile={"bakend": "eager"})


def test_strategy_without_apply_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import MappingProxyType

    from distlib.training import wrapping as wrap_module

    monkeypatch.setattr(wrap_module, "_APPLIERS", MappingProxyType(
        {k: v for k, v in wrap_module._APPLIERS.items() if k is not dl.XLA}))
    with pytest.raises(StrategyError, match="'xla' must have an apply function"):
        dl.wrap(torch.nn.Linear(2, 2), dl.XLA(), env=dl.Env())


def test_explicit_strategy_name_and_detect_default() -> None:
    model = dl.wrap(torch.nn.Linear(2, 2), "single", env=dl.Env())
    assert dl.unwrap(model) is model


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_computes_low_and_returns_fp32(precision: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    seen: list[torch.dtype] = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model = dl.wrap(model, dl.Env(precision=precision))
    out = model(torch.ones(2, 4))
    assert out.dtype == torch.float32
    assert seen == [dict(bf16=torch.bfloat16, fp16=torch.float16)[precision]]
    plain = dl.wrap(torch.nn.Linear(4, 1), dl.Env(precision=precision))
    clone = pickle.loads(pickle.dumps(plain))  # the autocast forward pickles
    assert clone(torch.ones(2, 4)).dtype == torch.float32


def test_fp16_overflow_skips_the_step_and_reports_it() -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = dl.wrap(model, dl.Env(precision="fp16"), optimizer=opt)
    before = [p.detach().clone() for p in model.parameters()]
    scale = opt.scaler.get_scale()
    loss = model(torch.full((1, 2), 1e5)).sum() * 1e5  # overflows once scaled in fp16 range
    dl.backward(loss, model)
    dl.clip_grad_norm(model, 1.0)
    opt.step()
    assert opt.step_was_skipped and opt.skipped_steps == 1
    assert opt.scaler.get_scale() == scale / 2
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b.detach())
    opt.zero_grad()
    dl.backward(model(torch.ones(1, 2)).sum(), model)
    opt.step()
    assert not opt.step_was_skipped and opt.skipped_steps == 1
    assert not torch.equal(before[0], model.weight.detach())


def test_two_models_keep_their_own_scalers() -> None:
    _a, oa = dl.wrap(torch.nn.Linear(2, 1), dl.Env(precision="fp16"),
                    optimizer=torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
    _b, ob = dl.wrap(torch.nn.Linear(2, 1), dl.Env(precision="fp16"),
                    optimizer=torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
    assert oa.scaler is not ob.scaler


def test_fp8_on_cpu_is_a_precision_error() -> None:
    with pytest.raises(PrecisionError, match="fp8"):
        dl.wrap(torch.nn.Linear(16, 16), dl.Env(precision="fp8"))


def test_compile_with_eager_backend_keeps_the_handle() -> None:
    inner = torch.nn.Linear(2, 2)
    model = dl.wrap(inner, dl.Env(), compile={"backend": "eager"})
    assert model is not inner and dl.unwrap(model) is inner
    dl.backward(model(torch.ones(1, 2)).sum(), model)
    assert inner.weight.grad is not None


def test_ddp_in_one_process_without_group_only_places() -> None:
    inner = torch.nn.Linear(2, 2)
    model = dl.wrap(inner, dl.DDP(), env=dl.Env())
    assert model is inner


def test_ddp_bf16_comm_hook_needs_nccl(group: None) -> None:
    with pytest.raises(StrategyError, match="comm_hook 'bf16' must run on the NCCL backend"):
        dl.wrap(_net(), dl.DDP(comm_hook="bf16"), env=dl.Env())


def test_ddp_in_a_one_rank_group_wraps_and_trains_like_single(group: None) -> None:
    reference = weights(_run(dl.Single()))
    got = weights(_run(dl.DDP(find_unused_parameters=True, comm_hook="fp16")))
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-2, atol=1e-3)


def test_plan_units_by_class_and_by_size() -> None:
    net = _net()
    assert plan_units(net, dl.FSDP(wrap_classes=("Block",))) == ["1", "0"]
    assert plan_units(net, dl.FSDP(min_num_params=70)) == ["1.fc", "0.fc"]  # innermost
    assert plan_units(net, dl.FSDP(min_num_params=10_000)) == []
    assert plan_units(net, dl.FSDP()) == []
    with pytest.raises(StrategyError, match="wrap_classes must name module classes"):
        plan_units(net, dl.FSDP(wrap_classes=("LlamaDecoderLayer",)))


def test_fsdp_needs_a_group() -> None:
    with pytest.raises(StrategyError, match="FSDP must run in a joined process group"):
        dl.wrap(_net(), dl.FSDP(), env=dl.Env())


def test_fsdp_matches_single_and_rebinds_optimizer(group: None) -> None:
    reference = weights(_run(dl.Single()))
    for strategy in (dl.FSDP(wrap_classes=("Block",)),
                     dl.FSDP(min_num_params=70, reshard_after_forward=False,
                             activation_checkpointing=True, state_dict_type="full")):
        got = weights(_run(strategy))
        assert got.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fsdp_mixed_precision_close_to_fp32(group: None, precision: str) -> None:
    reference = weights(_run(dl.Single()))
    got = weights(_run(dl.FSDP(wrap_classes=("Block",)), precision))
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=0.05, atol=0.02)


def test_fsdp_refuses_an_optimizer_with_state(group: None) -> None:
    model = _net()
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 8)).sum().backward()
    opt.step()
    with pytest.raises(StrategyError, match="optimizer must have no state"):
        dl.wrap(model, dl.FSDP(), env=dl.Env(), optimizer=opt)


def test_fsdp_state_dicts_sharded_and_full(group: None) -> None:
    model = dl.wrap(_net(), dl.FSDP(), env=dl.Env())
    values = fsdp_module.state_dict(model)
    assert all(type(v).__name__ == "DTensor" for v in values.values())
    model = dl.wrap(_net(), dl.FSDP(state_dict_type="full"), env=dl.Env())
    values = fsdp_module.state_dict(model)
    assert all(type(v) is torch.Tensor and v.device.type == "cpu" for v in values.values())
    torch.testing.assert_close(values, _net().state_dict())


def test_deepspeed_plan_config_fills_and_checks() -> None:
    env = fake_env(0, 4, precision="bf16")
    cfg = plan_config(dl.DeepSpeed(zero_stage=3, gradient_accumulation_steps=2,
                                   offload_optimizer="cpu", offload_param="cpu",
                                   config={"train_micro_batch_size_per_gpu": 8,
                                           "fp16": {"enabled": "auto"}}),
                      env, has_optimizer=True)
    assert cfg["train_batch_size"] == 64 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert cfg["zero_allow_untested_optimizer"] is True
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must agree"):
        plan_config(dl.DeepSpeed(gradient_accumulation_steps=2,
                                 config={"gradient_accumulation_steps": 4}),
                    env, has_optimizer=False)
    with pytest.raises(ConfigError, match=r"fp16\.enabled must agree"):
        plan_config(dl.DeepSpeed(config={"fp16": {"enabled": True}}), env, has_optimizer=False)
    with pytest.raises(ConfigError, match="offload_param must come with ZeRO stage 3"):
        plan_config(dl.DeepSpeed(zero_stage=2, offload_param="cpu"), env, has_optimizer=False)


def test_deepspeed_config_from_json_file(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 1}, "gradient_clipping": "auto"}')
    cfg = plan_config(dl.DeepSpeed(config=str(path), gradient_clipping=1.0), dl.Env(),
                      has_optimizer=False)
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["gradient_clipping"] == 1.0
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="readable JSON file"):
        plan_config(dl.DeepSpeed(config=str(path)), dl.Env(), has_optimizer=False)


def test_deepspeed_without_launcher_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(StrategyError, match="DeepSpeed must run in a process group"):
        dl.wrap(_net(), dl.DeepSpeed(), env=dl.Env())


@pytest.mark.slow
def test_deepspeed_zero_stages_match_single(group: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")  # what a launcher sets; DeepSpeed reads it
    # deepspeed's import runs os.environ.setdefault(...) on this; monkeypatch undoes it after.
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

    reference = weights(_run(dl.Single()))
    for stage in (0, 2, 3):
        got = weights(_run(dl.DeepSpeed(zero_stage=stage)))  # gathers ZeRO-3's partitions
        for key in reference:
            torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("build", "kind", "message"), [
    (lambda: dl.DDP(comm_hook="int8"), ConfigError, r"DDP: comm_hook must be one of 'none', "
     r"'fp16', 'bf16', 'powersgd', but got 'int8'\. Pick one of those"),
    (lambda: dl.DDP(bucket_cap_mb=-1), ConfigError, r"DDP: bucket_cap_mb must be >= 0"),
    (lambda: dl.FSDP(wrap_classes=("auto", "Block")), ConfigError, "'auto' alone"),
    (lambda: dl.FSDP(sync_module_states="yes"), TypeError, "sync_module_states must be bool"),
    (lambda: dl.DeepSpeed(zero_stage=5), ConfigError, "zero_stage must be one of 0, 1, 2, 3"),
    (lambda: dl.DeepSpeed(offload_param_nvme_path="/x"), ConfigError, "must come with"),
    (lambda: dl.XLA(spmd=1), TypeError, "spmd must be bool"),
])
def test_strategy_values_raise_distlib_errors(build: Any, kind: type, message: str) -> None:
    with pytest.raises(kind, match=message) as info:
        build()
    assert isinstance(info.value, ConfigError)  # a distlib error, whatever builtin it also is


# --- the mesh: refusals before anything starts (issue 14) ------------------------------------

def _mesh_env(strategy: object, **sizes: int) -> dl.Env:
    return dl.Env(world_size=4, rank=0, local_world_size=4, mesh=Mesh(**sizes),
                  strategy=strategy)  # type: ignore[arg-type]


def _llama(kv_heads: int = 2) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=kv_heads))


def _untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return (dl.unwrap(model) is model and type(model).__name__ != "FSDPSequential"
            and all(p is before[n] and type(p) is torch.nn.Parameter
                    for n, p in model.named_parameters()))


@pytest.mark.parametrize(("strategy", "sizes", "words"), [
    (dl.DDP(), {"dp_shard": 2, "tp": 2}, ["'ddp'", "dp_shard=2 x tp=2", "dl.FSDP()"]),
    (dl.DDP(), {"dp_shard": 2, "cp": 2}, ["'ddp'", "cp=2", "dl.FSDP()"]),
    (dl.DeepSpeed(), {"dp_shard": 2, "tp": 2}, ["'deepspeed'", "tp=2", "cannot compose"]),
    (dl.DeepSpeed(), {"dp_shard": 2, "cp": 2}, ["'deepspeed'", "cp=2"]),
    (dl.XLA(), {"dp_shard": 2, "tp": 2}, ["'xla'", "tp=2", "data parallel"]),
    (dl.Single(), {"dp_shard": 2, "tp": 2}, ["'single'", "tp=2"]),
])
def test_wrap_refuses_a_model_parallel_mesh_the_strategy_cannot_apply(
        strategy: object, sizes: dict[str, int], words: list[str]) -> None:
    model = _net()
    before = dict(model.named_parameters())
    with pytest.raises(StrategyError, match=r"must run on a data-parallel mesh") as info:
        dl.wrap(model, _mesh_env(strategy, **sizes))
    for word in words:
        assert word in str(info.value)
    assert _untouched(model, before) and not dl.runtime.is_initialized()


def _plan_error(model: torch.nn.Module, tp_plan: Any, **sizes: int) -> str:
    before = dict(model.named_parameters())
    with pytest.raises(StrategyError) as info:
        dl.wrap(model, _mesh_env(dl.FSDP(), **sizes), tp_plan=tp_plan)
    assert _untouched(model, before) and not dl.runtime.is_initialized()
    return str(info.value)


def test_wrap_refuses_a_tp_plan_it_cannot_apply() -> None:
    tp = {"dp_shard": 2, "tp": 2}
    msg = _plan_error(_net(), {"layers.*.fc": "colwise"}, **tp)
    assert "'layers.*.fc' must name a submodule" in msg and "'0'" in msg
    msg = _plan_error(_net(), {"0.fc": "columnwise"}, **tp)
    assert "tp_plan['0.fc'] must be one of" in msg and "'columnwise'" in msg and "'colwise'" in msg
    msg = _plan_error(_net(), "auto", **tp)
    assert "tp_plan='auto' must find the model's own" in msg and "Sequential" in msg
    msg = _plan_error(_net(), "colwise", **tp)
    assert "tp_plan must be 'auto' or a mapping" in msg
    msg = _plan_error(net(8, 9, 2), {"0.fc": "colwise"}, **tp)
    assert "out_features, which must divide by tp=2, but got out_features=9" in msg
    msg = _plan_error(_net(), {"0.*": "colwise", "0.fc": "rowwise"}, **tp)
    assert "each module one style" in msg and "'0.fc'" in msg
    msg = _plan_error(_net(), {"0.fc": "colwise"}, dp_shard=4)
    assert "tp_plan must come with a tensor-parallel mesh (tp > 1)" in msg and "dp_shard=4" in msg


def test_wrap_refuses_heads_the_tp_size_does_not_divide() -> None:
    msg = _plan_error(_llama(kv_heads=2), "auto", dp_shard=1, tp=4)
    assert "config.num_key_value_heads must divide by tp=4, but got num_key_value_heads=2" in msg
    assert "at most 2" in msg


def test_wrap_refuses_context_parallel_on_cpu() -> None:
    msg = _plan_error(_net(), "auto", dp_shard=2, cp=2)
    assert "context parallelism (cp > 1) must run on CUDA" in msg and "'cpu'" in msg


def test_the_auto_plan_is_the_transformers_models_own() -> None:
    plan = plan_tensor_parallel(_llama(), "auto", 2)
    assert type(plan["model.layers.1.self_attn.k_proj"]) is ColwiseParallel
    assert type(plan["model.layers.0.mlp.down_proj"]) is RowwiseParallel
    assert isinstance(plan["lm_head"], ColwiseParallel)
    assert plan["lm_head"].output_layouts == (Replicate(),)  # colwise_gather_output
    assert plan["model.embed_tokens"].input_layouts == (Replicate(),)  # embedding_rowwise
    assert "model.norm" not in plan and len(plan) == 2 * 7 + 2
    # The config's plan serves a model without its own (prefixed by the base model's name).
    model = _llama()
    model._tp_plan = {}
    assert set(plan_tensor_parallel(model, "auto", 2)) == {
        n for n in plan if n not in ("lm_head", "model.embed_tokens")}


def test_a_plan_that_would_untie_tied_weights_is_refused() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(StrategyError) as info:
        plan_tensor_parallel(tied, "auto", 2)
    msg = str(info.value)
    assert "must keep tied weights one tensor" in msg and "tie_word_embeddings=False" in msg
    assert "'lm_head.weight'" in msg and "'model.embed_tokens.weight'" in msg
    assert "['lm_head', 'model.embed_tokens']" in msg
    # A plan that leaves the tied modules alone keeps them one tensor: allowed.
    layers = {"model.layers.*.mlp.up_proj": "colwise", "model.layers.*.mlp.down_proj": "rowwise"}
    assert len(plan_tensor_parallel(tied, layers, 2)) == 2


def test_the_mesh_planner_reads_the_auto_plan_wrap_applies() -> None:
    # one reader (auto_tp_plan): a model whose plan is only its config's is planned as applied
    model = _llama()
    model._tp_plan = {}
    applied = plan_tensor_parallel(model, "auto", 2)
    planned = dl.training.plan.plan_parallelism(model, Mesh(dp_shard=1, tp=2))
    assert {t.name.rpartition(".")[0] for t in planned.tensors if t.style} == set(applied)


def test_hybrid_shard_is_dp_replicate_num_nodes() -> None:
    env = dl.Env(world_size=8, rank=0, local_world_size=4, num_nodes=2, mesh=Mesh(tp=2))
    assert fsdp_module.mesh_env(dl.FSDP(hybrid_shard=True), env).mesh == Mesh(
        dp_replicate=2, dp_shard=2, tp=2)
    assert fsdp_module.mesh_env(dl.FSDP(), env) is env
    agreeing = dl.Env(world_size=8, rank=0, local_world_size=4, num_nodes=2,
                      mesh=Mesh(dp_replicate=2))
    assert fsdp_module.mesh_env(dl.FSDP(hybrid_shard=True), agreeing) is agreeing
    disagreeing = dl.Env(world_size=8, rank=0, local_world_size=2, num_nodes=2,
                         mesh=Mesh(dp_replicate=4))
    with pytest.raises(StrategyError, match=r"num_nodes=2 and mesh dp_replicate=4 x dp_shard=2"):
        fsdp_module.mesh_env(dl.FSDP(hybrid_shard=True), disagreeing)


def test_context_parallel_is_a_no_op_at_cp_1_and_refused_on_cpu() -> None:
    ids = torch.arange(8).reshape(1, 8)
    with dl.training.context_parallel(dl.Env(), [ids], [1]):
        assert ids.shape == (1, 8)
    with (pytest.raises(StrategyError, match=r"seq_dims must give one dimension per buffer"),
          dl.training.context_parallel(dl.Env(), [ids], [1, 1])):
        pass
    env = dl.Env(world_size=2, rank=0, local_world_size=2, mesh=Mesh(dp_shard=1, cp=2))
    with (pytest.raises(StrategyError, match=r"context_parallel\(\): context parallelism"),
          dl.training.context_parallel(env, [ids], [1])):
        pass
    assert not dl.runtime.is_initialized()


@pytest.mark.parametrize(("strategy", "named"), [
    (dl.FSDP(activation_checkpointing=True), "activation_checkpointing (needs 1 unit)"),
    (dl.FSDP(forward_prefetch=True), "forward_prefetch (needs 2 units)"),
    (dl.FSDP(min_num_params=10**9, activation_checkpointing=True, forward_prefetch=True),
     "activation_checkpointing (needs 1 unit) and forward_prefetch (needs 2 units)"),
])
def test_fsdp_refuses_unit_options_the_model_gives_nothing_to_act_on(
        group: None, strategy: dl.FSDP, named: str) -> None:
    """A setting wrap cannot honour (no units to checkpoint or prefetch) is refused, not ignored."""
    with pytest.raises(StrategyError, match=re.escape(named)) as caught:
        dl.wrap(_net(), strategy, env=dl.Env())
    assert "Set wrap_classes" in str(caught.value) and "Sequential" in str(caught.value)


def test_fsdp_unit_options_apply_when_the_model_has_units(group: None) -> None:
    strategy = dl.FSDP(wrap_classes=("Block",), activation_checkpointing=True,
                       forward_prefetch=True)
    reference = weights(_run(dl.Single()))
    got = weights(_run(strategy))
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-6)
