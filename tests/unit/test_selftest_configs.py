"""Every valid launch config is one the self-test can plan for, without launching anything.

The configs are enumerated from the settings table (`distlib.launcher.settings.TABLE`):
each strategy with each value of each of its options (and of the mesh and precision), plus
combinations a user writes. For each, every rank's `Env` is built from the variables the
launcher hands it; the self-test's toy models are built as the checks build them, and
wrap's own planners (FSDP units, tensor-parallel plans, DeepSpeed's config) must accept them.
The missing-backend refusal is tested through its find_spec seam, and for real with a
hidden module in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from distlib.cli import _checks
from distlib.cli._selftest import AUTO_CLASS, plan_self_test
from distlib.cli.test import not_checked
from distlib.env import Env, Hardware, detect
from distlib.errors import ConfigError
from distlib.launcher._backends import BACKENDS, missing_backend
from distlib.launcher._environ import child_environ
from distlib.launcher.config import resolve, to_plan
from distlib.launcher.plan import LaunchPlan
from distlib.launcher.settings import SETTINGS, TABLE
from distlib.strategies.deepspeed import DeepSpeed
from distlib.strategies.fsdp import FSDP
from distlib.training.deepspeed import plan_config
from distlib.training.fsdp import plan_units
from distlib.training.tp import plan_tensor_parallel

# A DeepSpeed config as users write it: blocks the self-test can use and two it cannot.
DS_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4,
             "gradient_clipping": 0.5, "zero_optimization": {"stage": 1},
             "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
             "optimizer": {"type": "AdamW", "params": {"lr": 0.001}},
             "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}

# Values of the options whose kind does not enumerate them (bools and choices do).
OPEN_VALUES: dict[str, tuple[Any, ...]] = {
    "fsdp_wrap_classes": ("Block", "auto", "Block,Layer,Head", "A,B,C,D,E",
                          "LlamaDecoderLayer"),
    "fsdp_min_num_params": (0, 50, 10**9),
    "deepspeed_config_file": ("{ds_config}",),
    "gradient_accumulation_steps": (1, 3),
    "gradient_clipping": (0.5,),
    "offload_optimizer_nvme_path": ("/tmp/nvme",),
    "offload_param_nvme_path": ("/tmp/nvme",),
}
# Options that only make sense with others (DeepSpeed refuses them alone).
REQUIRES: dict[str, dict[str, Any]] = {
    "offload_param_device": {"zero_stage": 3},
    "offload_optimizer_nvme_path": {"offload_optimizer_device": "nvme"},
    "offload_param_nvme_path": {"offload_param_device": "nvme", "zero_stage": 3},
}
MESHES = ({"tp_size": 2}, {"dp_replicate_size": 2}, {"cp_size": 2},
          {"dp_replicate_size": 2, "tp_size": 2})
COMBINATIONS = (  # what users write together
    {"strategy": "fsdp", "fsdp_wrap_classes": "Block", "fsdp_activation_checkpointing": True,
     "fsdp_forward_prefetch": True, "tp_size": 2, "precision": "bf16"},
    {"strategy": "fsdp", "fsdp_wrap_classes": "auto", "cp_size": 2, "tp_size": 2},
    {"strategy": "fsdp", "fsdp_min_num_params": 50, "fsdp_cpu_offload": True,
     "fsdp_state_dict_type": "full", "fsdp_hybrid_shard": True},
    {"strategy": "deepspeed", "deepspeed_config_file": "{ds_config}", "zero_stage": 1,
     "gradient_accumulation_steps": 4, "gradient_clipping": 0.5, "precision": "bf16"},
    {"strategy": "deepspeed", "zero_stage": 3, "offload_optimizer_device": "cpu",
     "offload_param_device": "cpu", "zero3_save_16bit_model": True, "precision": "fp16"},
)


def _values(name: str) -> tuple[Any, ...]:
    setting = SETTINGS[name]
    if setting.kind is bool:
        return (True, False)
    return setting.choices or OPEN_VALUES[name]


def _valid_configs() -> list[dict[str, Any]]:
    """Every strategy alone, with each precision, each value of each of its options, the
    meshes FSDP takes, and the combinations above."""
    configs: list[dict[str, Any]] = []
    for strategy in SETTINGS["strategy"].choices:
        configs += [{"strategy": strategy, "precision": p} for p in SETTINGS["precision"].choices
                    if strategy != "xla" or p != "fp8"]
        for setting in TABLE:
            if setting.group != strategy:
                continue
            for value in _values(setting.name):
                needs = REQUIRES.get(setting.name, {}) if value != "none" else {}
                configs.append({"strategy": strategy, **needs, setting.name: value})
    configs += [{"strategy": "fsdp", **mesh} for mesh in MESHES]
    configs += [{**mesh} for mesh in MESHES]  # strategy auto: fsdp for a tp/cp mesh
    return configs + [dict(c) for c in COMBINATIONS]


def test_the_enumeration_covers_every_option_of_every_strategy() -> None:
    options = {s.name for s in TABLE if s.strategy_option is not None}
    covered = {key for config in _valid_configs() for key in config}
    assert options <= covered, sorted(options - covered)
    assert {c["strategy"] for c in _valid_configs() if "strategy" in c} == set(
        SETTINGS["strategy"].choices)
    for name in options:  # a new option of an open kind needs values here
        assert SETTINGS[name].kind is bool or SETTINGS[name].choices or name in OPEN_VALUES, name


def _plan(config: dict[str, Any], ds_config: Path) -> LaunchPlan:
    values = {k: str(ds_config) if v == "{ds_config}" else v for k, v in config.items()}
    world = 4 if any(k in values for k in ("tp_size", "cp_size", "dp_replicate_size")) else 2
    if "dp_replicate_size" in values and "tp_size" in values:
        world = 8
    cpu = {"cpu": True}
    if values.get("strategy") == "xla":  # not on --cpu; one process on XLA's CPU client
        cpu, world = {}, 1
    return to_plan(resolve({**cpu, "num_processes": world, **values}, {}, {}))


def _rank_env(plan: LaunchPlan, rank: int) -> Env:
    """Rank ``rank``'s Env from the variables the launcher hands it (on a pretend GPU host
    when the plan is xla: detect() refuses xla without torch_xla only when it joins)."""
    world = int(plan.world_size or 1)
    environ = child_environ({}, plan) | {
        "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    return detect(environ, hardware=Hardware(num_gpus=0))


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ds") / "ds_config.json"
    path.write_text(json.dumps(DS_CONFIG))
    return path


def _check_fsdp(env: Env, plan: Any) -> None:
    """The checks' models carry every wrap class, and FSDP's planner makes units of them."""
    strategy = plan.strategy
    models = [_checks._net(0, plan), _checks._tiny_model(env.mesh.tp, plan)[1]]
    for model in models:
        units = plan_units(model, strategy)
        modules = dict(model.named_modules())
        got = {type(modules[name]).__name__ for name in units}
        if strategy.wrap_classes == ("auto",):
            assert got == set(model._no_split_modules), got
        elif strategy.wrap_classes:
            assert got == set(strategy.wrap_classes), (got, strategy.wrap_classes)
    if env.mesh.tp > 1:
        net = models[0]
        assert sorted(plan_tensor_parallel(net, _checks._net_plan(env, net), env.mesh.tp)) == \
            sorted(_checks._linears(net))
        _, model, tp_plan, _ = _checks._tiny_model(env.mesh.tp, plan)
        assert plan_tensor_parallel(model, tp_plan, env.mesh.tp)


def _check_deepspeed(env: Env, plan: Any) -> None:
    config = plan_config(plan.strategy, env, has_optimizer=True)
    assert "optimizer" not in config and "scheduler" not in config  # the checks bring SGD
    assert config["gradient_accumulation_steps"] in (1, plan.accumulation_steps)
    assert plan.max_norm > 0


@pytest.mark.parametrize("config", _valid_configs(), ids=lambda c: ",".join(
    f"{k}={v}" for k, v in c.items()))
def test_the_self_test_plans_every_valid_config(config: dict[str, Any], ds_config: Path) -> None:
    launch = _plan(config, ds_config)
    assert not_checked(launch) == plan_self_test(_rank_env(launch, 0).strategy).not_checked
    for rank in range(int(launch.world_size or 1)):
        env = _rank_env(launch, rank)
        plan = plan_self_test(env.strategy)
        assert type(plan.strategy) is type(env.strategy)
        if isinstance(env.strategy, FSDP):
            _check_fsdp(env, plan)
        elif isinstance(env.strategy, DeepSpeed):
            _check_deepspeed(env, plan)


def test_wrap_classes_become_classes_of_the_toy_models() -> None:
    plan = plan_self_test(FSDP(wrap_classes="Block"))
    net = _checks._net(0, plan)
    assert [type(m).__name__ for m in net] == ["Block", "Tanh", "Block"]
    assert isinstance(net[0], torch.nn.Linear)  # still a Linear: tp styles and FSDP apply
    assert plan_units(net, FSDP(wrap_classes="Block")) == ["2", "0"]
    auto = plan_self_test(FSDP(wrap_classes="auto"))
    assert (auto.unit_classes, auto.no_split_modules) == ((AUTO_CLASS,), True)
    assert _checks._net(0, auto)._no_split_modules == [AUTO_CLASS]
    five = _checks._net(0, plan_self_test(FSDP(wrap_classes="A,B,C,D,E")))
    assert [type(m).__name__ for m in five if isinstance(m, torch.nn.Linear)] == [
        "A", "B", "C", "D", "E", "A"]
    assert five(torch.ones(3, 8)).shape == (3, 1)
    # the same weights as the plain model: the reference and the ranks agree however named
    plain, named = _checks._net(0), _checks._net(0, plan)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 named.state_dict().values(), strict=True))


def test_llama_layers_take_the_wrap_classes_or_keep_their_own_list() -> None:
    pytest.importorskip("transformers")
    _, llama, _, _ = _checks._tiny_model(2, plan_self_test(FSDP(wrap_classes="Block,Layer,Head")))
    layers = [type(layer).__name__ for layer in llama.model.layers]
    assert layers == ["Block", "Layer", "Head"]
    _, auto, _, _ = _checks._tiny_model(2, plan_self_test(FSDP(wrap_classes="auto")))
    assert plan_units(auto, FSDP(wrap_classes="auto")) == ["model.layers.1", "model.layers.0"]


def test_a_deepspeed_config_file_is_used_less_what_needs_the_users_model(
        ds_config: Path) -> None:
    plan = plan_self_test(DeepSpeed(config=str(ds_config)))
    assert (plan.accumulation_steps, plan.max_norm) == (4, 0.5)
    assert plan.strategy.config == {k: v for k, v in DS_CONFIG.items()
                                    if k not in ("optimizer", "scheduler")}
    assert plan.not_checked == (
        "deepspeed_config_file: its `optimizer` block (AdamW): needs your model (the self-test "
        "trains with its own SGD)",
        "deepspeed_config_file: its `scheduler` block (WarmupLR): needs your model (the "
        "self-test trains with its own SGD)")
    options = plan_self_test(DeepSpeed(gradient_accumulation_steps=3, gradient_clipping=2.0))
    assert (options.accumulation_steps, options.max_norm, options.not_checked) == (3, 2.0, ())


@pytest.mark.parametrize(("content", "why"), [
    (None, "No such file or directory"),
    ("{not json", "Expecting property name"),
    ("[1, 2]", "must hold a JSON object, but got a list"),
])
def test_a_bad_deepspeed_config_file_is_refused_naming_it(tmp_path: Path, content: str | None,
                                                          why: str) -> None:
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        plan_self_test(DeepSpeed(config=str(path)))
    message = str(caught.value)
    assert message.startswith("self-test: `deepspeed_config_file` must ")
    assert repr(str(path)) in message and why in message


def test_unit_only_fsdp_options_without_units_are_reported_not_failed() -> None:
    plan = plan_self_test(FSDP(activation_checkpointing=True, forward_prefetch=True))
    assert plan.not_checked == (
        "fsdp_activation_checkpointing, fsdp_forward_prefetch: wrap applies it to FSDP units, "
        "and with no fsdp_wrap_classes and no fsdp_min_num_params no model has any (wrap "
        "refuses it on yours unless it has units)",)
    # the self-test's own wrap leaves them out (wrap would refuse them on its toy models)
    assert not plan.strategy.activation_checkpointing and not plan.strategy.forward_prefetch
    assert plan_self_test(FSDP(activation_checkpointing=True, wrap_classes="Block")
                          ).not_checked == ()


def test_the_report_lists_what_was_not_checked_without_failing() -> None:
    from distlib.cli.test import format_report

    check = {"name": "distlib.cli._checks:check_training", "ok": True, "detail": "fine"}
    report = {"rank": 0, "world": 1, "local": 0, "node": 0, "device": "cpu",
              "backend": "gloo", "strategy": "deepspeed", "precision": "no", "checks": [check]}
    text, ok = format_report({0: report}, ("deepspeed_config_file: its `optimizer` block "
                                           "(AdamW): needs your model",))
    assert ok and text.splitlines()[-1] == "distlib test: PASSED (1 ranks, 1 checks each)"
    assert ("  not checked  deepspeed_config_file: its `optimizer` block (AdamW): needs your "
            "model") in text.splitlines()


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.module)
def test_a_missing_backend_is_one_line_naming_the_install(backend: Any) -> None:
    plan = LaunchPlan(nproc_per_node=1, **{backend.setting: backend.value})
    seen: list[str] = []

    def found(name: str) -> bool:
        seen.append(name)
        return name != backend.module

    message = missing_backend(plan, found=found)
    assert message is not None and "\n" not in message
    assert message.startswith(f"launch settings: `{backend.setting}` {backend.value!r} must "
                              f"have the module `{backend.module}` installed, but got no "
                              f"`{backend.module}` in this Python ({sys.executable}).")
    assert message.endswith(f"Install it: {backend.install}")
    assert missing_backend(plan, found=lambda name: True) is None
    assert backend.module in seen


def test_plans_without_an_optional_backend_look_nothing_up() -> None:
    looked: list[str] = []
    for strategy in ("single", "ddp", "fsdp", None):
        plan = LaunchPlan(nproc_per_node=2, strategy=strategy, precision="bf16")
        assert missing_backend(plan, found=lambda name: looked.append(name) or False) is None
    assert looked == []
    assert "torch-distlib[deepspeed]" in BACKENDS[0].install
    assert "torch-distlib[xla]" in BACKENDS[1].install


HIDE = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None\n"
# Fails loudly if the launcher process imports torch before refusing.
NO_TORCH = textwrap.dedent("""
    import atexit, sys
    atexit.register(lambda: sys.stderr.write("TORCH IMPORTED\\n") if "torch" in sys.modules
                    else None)
""")


@pytest.mark.parametrize(("flags", "module", "install"), [
    (["--strategy", "deepspeed"], "deepspeed", "pip install 'torch-distlib[deepspeed]'"),
    (["--strategy", "xla"], "torch_xla", "pip install 'torch-distlib[xla]'"),
    (["--precision", "fp8"], "torchao", "pip install torchao"),
])
def test_distlib_test_refuses_a_missing_backend_before_launching(
        tmp_path: Path, flags: list[str], module: str, install: str) -> None:
    (tmp_path / "sitecustomize.py").write_text(HIDE.format(names=[module]) + NO_TORCH)
    path = os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-m", "distlib", "test", "--num-processes", "2",
                           *flags], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=path, HOME=str(tmp_path)))
    assert done.returncode != 0
    assert done.stdout == ""  # nothing launched: no "config" line, no table
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert f"no `{module}` in this Python" in lines[0]
    assert lines[0].endswith(f"Install it: {install}")
    assert "ModuleNotFoundError" not in done.stderr and "TORCH IMPORTED" not in done.stderr


def test_without_transformers_the_mlp_carries_every_wrap_class(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # a test extra, not a dependency
    strategy = FSDP(wrap_classes="A,B,C,D,E,F")
    name, mlp, _, vocab = _checks._tiny_model(2, plan_self_test(strategy))
    modules = dict(mlp.named_modules())
    assert name == "mlp"
    assert {type(modules[n]).__name__ for n in plan_units(mlp, strategy)} == set("ABCDEF")
    assert mlp(torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, vocab)
    _, plain, _, _ = _checks._tiny_model(2)
    assert sorted(plain.state_dict()) == ["down.bias", "down.weight", "embed.weight",
                                          "head.bias", "head.weight", "up.bias", "up.weight"]


def test_the_no_torch_sentinel_sees_torch(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(NO_TORCH)
    done = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert "TORCH IMPORTED" in done.stderr
