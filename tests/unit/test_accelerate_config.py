"""Accelerate config files: every key translated, a no-op with its reason, or refused.

The fixtures in tests/data/accelerate/ are written in Accelerate's format (its default
single/multi-GPU/CPU files, FSDP1/FSDP2 files including its own ``latest_fsdp.yaml``,
DeepSpeed, parallelism, dynamo, fp8, mpirun, ipex, TPU, SageMaker). For each one the test
states the exact distlib settings it means, or every key that is refused.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from distlib.cli import main
from distlib.errors import ConfigError, StrategyError
from distlib.launcher import _accelerate_config as accelerate
from distlib.launcher.config import read_config, read_config_data, resolve, to_plan, validate
from distlib.strategies.deepspeed import DeepSpeed
from distlib.strategies.fsdp import FSDP
from distlib.testing import fake_env
from distlib.training.deepspeed import plan_config
from distlib.training.fsdp import plan_units

DATA = Path(__file__).parent.parent / "data" / "accelerate"
LOCAL = {"machine_rank": 0, "num_machines": "1", "rdzv_backend": "static", "cpu": False}
BASE = LOCAL | {"debug": False}

TRANSLATED: dict[str, dict[str, Any]] = {
    "single_gpu.yaml": LOCAL | {"gpu_ids": "all", "precision": "no", "num_processes": 1},
    "legacy_0_11.yaml": {"machine_rank": 0, "precision": "no", "num_machines": "1",
                         "num_processes": 1, "cpu": False},
    "multi_gpu.yaml": BASE | {"strategy": "ddp", "gpu_ids": "0,1", "precision": "bf16",
                              "num_processes": 2, "main_port": 29555},
    "multi_cpu.yaml": BASE | {"strategy": "ddp", "cpu": True, "main_address": "127.0.0.1",
                              "main_port": 29500, "precision": "no", "num_processes": 4},
    "multi_node.yaml": BASE | {"strategy": "ddp", "gpu_ids": "all", "machine_rank": 1,
                               "main_address": "10.0.0.1", "main_port": 29500,
                               "precision": "fp16", "num_machines": "2",
                               "num_processes": 16, "rdzv_backend": "c10d"},
    "dynamo_off.yaml": BASE | {"strategy": "ddp", "precision": "no"},
    "tpu.yaml": BASE | {"strategy": "xla", "precision": "bf16", "num_processes": 1},
    "fsdp1_transformer_classes.yaml": BASE | {
        "strategy": "fsdp", "fsdp_activation_checkpointing": True, "fsdp_cpu_offload": True,
        "fsdp_hybrid_shard": False, "fsdp_reshard_after_forward": False,
        "fsdp_state_dict_type": "full", "fsdp_sync_module_states": True,
        "fsdp_wrap_classes": "GPT2Block,GPT2MLP", "precision": "bf16", "num_processes": 2},
    "latest_fsdp_without_ram_efficient_loading.yaml": BASE | {
        "strategy": "fsdp", "fsdp_activation_checkpointing": False, "fsdp_cpu_offload": False,
        "fsdp_hybrid_shard": False, "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "sharded", "fsdp_sync_module_states": True,
        "fsdp_wrap_classes": "BertLayer", "precision": "no", "num_processes": 1},
    "fsdp2_auto_wrap.yaml": BASE | {
        "strategy": "fsdp", "fsdp_activation_checkpointing": False, "fsdp_wrap_classes": "auto",
        "fsdp_cpu_offload": False, "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "sharded", "precision": "bf16", "num_processes": 8},
    "fsdp_auto_wrap_sync_prefetch.yaml": BASE | {
        "strategy": "fsdp", "cpu": True, "fsdp_activation_checkpointing": False,
        "fsdp_wrap_classes": "auto", "fsdp_forward_prefetch": True, "fsdp_cpu_offload": False,
        "fsdp_hybrid_shard": False, "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "sharded", "fsdp_sync_module_states": True,
        "precision": "no", "num_processes": 2},
    "fsdp_hybrid_shard.yaml": BASE | {
        "strategy": "fsdp", "fsdp_hybrid_shard": True, "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "sharded", "precision": "no", "num_processes": 2},
    "fsdp_hybrid_shard_zero2.yaml": BASE | {
        "strategy": "fsdp", "fsdp_hybrid_shard": True, "fsdp_reshard_after_forward": False,
        "fsdp_cpu_offload": False, "precision": "no", "num_processes": 2},
    "fsdp_size_based.yaml": BASE | {
        "strategy": "fsdp", "fsdp_min_num_params": 100_000_000, "fsdp_cpu_offload": False,
        "fsdp_hybrid_shard": False, "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "full", "precision": "fp16", "num_processes": 2},
    "fp8_ao.yaml": BASE | {"strategy": "fsdp", "fsdp_reshard_after_forward": True,
                           "precision": "fp8", "num_processes": 2},
    "deepspeed_stage2.yaml": BASE | {
        "strategy": "deepspeed", "gradient_accumulation_steps": 4, "gradient_clipping": 1.0,
        "offload_optimizer_device": "cpu", "offload_param_device": "none", "zero_stage": 2,
        "precision": "bf16", "num_processes": 2},
    "deepspeed_stage3_nvme.yaml": BASE | {
        "strategy": "deepspeed", "gradient_accumulation_steps": 1,
        "offload_optimizer_device": "nvme", "offload_optimizer_nvme_path": "/local_nvme",
        "offload_param_device": "nvme", "offload_param_nvme_path": "/local_nvme",
        "zero3_save_16bit_model": True, "zero_stage": 3, "precision": "fp16",
        "num_processes": 8},
    # Accelerate's torch_native_parallelism templates: the parallelism_config block is the mesh
    "tp_hsdp.yaml": BASE | {
        "strategy": "fsdp", "fsdp_activation_checkpointing": False, "fsdp_wrap_classes": "auto",
        "fsdp_cpu_offload": False, "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "sharded", "precision": "bf16", "num_processes": 8,
        "dp_replicate_size": 2, "dp_shard_size": 2, "cp_size": 1, "tp_size": 2},
    "cp.yaml": BASE | {
        "strategy": "fsdp", "fsdp_activation_checkpointing": True, "fsdp_wrap_classes": "auto",
        "fsdp_cpu_offload": False, "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "sharded", "precision": "bf16", "num_processes": 8,
        "dp_replicate_size": 1, "dp_shard_size": 1, "cp_size": 8, "tp_size": 1},
    "deepspeed_config_file.yaml": LOCAL | {"strategy": "deepspeed", "num_processes": 4,
                                           "deepspeed_config_file": "ds_zero1.json"},
}

REFUSED: dict[str, list[str]] = {
    "latest_fsdp.yaml": ["fsdp_config.fsdp_cpu_ram_efficient_loading"],
    "fsdp_no_shard.yaml": ["fsdp_config.fsdp_sharding_strategy"],
    "fsdp_sync_and_prefetch.yaml": ["fsdp_config.fsdp_backward_prefetch",
                                    "fsdp_config.fsdp_use_orig_params",
                                    "fsdp_config.fsdp_activation_checkpointing_offload"],
    "deepspeed_zero3_init.yaml": ["deepspeed_config.zero3_init_flag"],
    "deepspeed_multinode_pdsh.yaml": ["deepspeed_config.deepspeed_hostfile",
                                      "deepspeed_config.deepspeed_multinode_launcher",
                                      "deepspeed_config.deepspeed_inclusion_filter"],
    "parallelism_unsupported.yaml": ["parallelism_config.parallelism_config_cp_comm_strategy",
                                     "parallelism_config.parallelism_config_sp_size"],
    "dynamo.yaml": ["dynamo_config.dynamo_backend"],
    "fp8_te.yaml": ["fp8_config.amax_compute_algo", "fp8_config.backend",
                    "fp8_config.fp8_format", "fp8_config.override_linear_precision"],
    "mpirun.yaml": ["mpirun_config.mpirun_hostfile"],
    "ipex.yaml": ["enable_cpu_affinity", "ipex_config.ipex"],
    "tpu_pod.yaml": ["downcast_bf16", "main_training_function", "tpu_use_cluster"],
    "sagemaker.yaml": ["compute_environment", "ec2_instance_type", "iam_role_name"],
    "megatron.yaml": ["distributed_type", "megatron_lm_config.megatron_lm_tp_degree",
                      "megatron_lm_config.megatron_lm_pp_degree"],
    "invalid_keys.yaml": ["invalid_key", "another_invalid_key", "num_procesess"],
}


def _keys(data: dict[str, Any]) -> list[str]:
    """Every key of a file as the notes name it: sections with content expand."""
    out = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out += [f"{key}.{inner}" for inner in value]
        else:
            out.append(key)
    return out


def _problem_keys(error: ConfigError) -> list[str]:
    text = str(error)
    listed = re.findall(r"^\s+\d+\. `([^`]+)`", text, flags=re.M)
    return listed or re.findall(r"^config file [^:]+: `([^`]+)`", text)


def test_the_fixtures_cover_accelerates_formats() -> None:
    files = sorted(p.name for p in DATA.glob("*.yaml"))
    assert len(files) >= 21
    assert sorted([*TRANSLATED, *REFUSED]) == files


@pytest.mark.parametrize("name", sorted(TRANSLATED))
def test_each_accepted_file_means_exactly_these_settings(name: str) -> None:
    path = DATA / name
    config = read_config(str(path))
    assert config.accelerate
    assert config.settings == TRANSLATED[name]
    notes = [note.key for note in config.notes]
    assert sorted(notes) == sorted(_keys(yaml.safe_load(path.read_text())))
    assert all(note.outcome in ("translated", "no-op") for note in config.notes)
    to_plan(resolve({}, config.settings, {}))  # and it makes a launch plan


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_each_refused_file_names_every_refused_key(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        read_config(str(DATA / name))
    assert sorted(_problem_keys(info.value)) == sorted(REFUSED[name])
    for line in str(info.value).splitlines()[1:]:
        assert " must " in line and ", but got " in line  # STYLE 3.5: rule, value, fix


def test_refusals_say_why_and_what_to_do() -> None:
    cases = {"latest_fsdp.yaml": ["fsdp_cpu_ram_efficient_loading", "True", "false",
                                  "dl.load_checkpoint", "docs/big_training.md",
                                  "fsdp_sync_module_states"],
             "fsdp_no_shard.yaml": ["'NO_SHARD'", "MULTI_GPU", "DDP"],
             "dynamo.yaml": ["'INDUCTOR'", "compile={'backend': 'inductor', 'mode': "
                             "'max-autotune', 'fullgraph': True, 'dynamic': False}", "dl.wrap"],
             "parallelism_unsupported.yaml": ["'alltoall'", "'allgather'", "ALST/Ulysses",
                                              "parallelism_config_cp_size"],
             "mpirun.yaml": ["/home/user/hostfile", "distlib launch"],
             "invalid_keys.yaml": ["Did you mean `num_processes`?"]}
    for name, words in cases.items():
        with pytest.raises(ConfigError) as info:
            read_config(str(DATA / name))
        for word in words:
            assert word in str(info.value), (name, word)


def test_three_unknown_keys_are_all_reported() -> None:
    data = {"distributed_type": "FSDP", "mixed_precison": "bf16",
            "fsdp_config": {"fsdp_wrap_policy": "NO_WRAP", "fsdp_offload_params": True},
            "deepspeed_config": {"zero_stag": 2}}
    with pytest.raises(ConfigError) as info:
        read_config_data(data)
    text = str(info.value)
    assert sorted(_problem_keys(info.value) or re.findall(r"\d+\. `([^`]+)`", text)) == sorted(
        ["mixed_precison", "fsdp_config.fsdp_wrap_policy", "deepspeed_config.zero_stag"])
    assert "3 settings" in text
    for hint in ("`mixed_precision`", "`fsdp_auto_wrap_policy`", "`zero_stage`"):
        assert f"Did you mean {hint}?" in text


def test_bad_values_name_the_key_as_written() -> None:
    with pytest.raises(ConfigError) as info:
        read_config_data({"distributed_type": "MULTI_GPU", "mixed_precision": "fp9"})
    text = str(info.value)
    assert "`mixed_precision` (distlib's `precision`) must be one of" in text and "'fp9'" in text
    with pytest.raises(ConfigError, match=r"`fsdp_config\.fsdp_offload_params` "):
        read_config_data({"distributed_type": "FSDP",
                          "fsdp_config": {"fsdp_offload_params": "maybe"}})
    with pytest.raises(ConfigError, match="`main_process_port` "):
        read_config_data({"distributed_type": "MULTI_GPU", "main_process_port": "high"})
    with pytest.raises(ConfigError, match=r"^config: `precision` must be one of"):
        read_config_data({"precision": "fp9"})  # distlib's own flat format: its own names


def test_translation_and_validation_problems_come_together() -> None:
    data = {"distributed_type": "FSDP", "mixed_precision": "fp9", "gpu_ids": ["0"],
            "fsdp_config": {"fsdp_sync_module_states": "maybe", "fsdp_flat": 1}}
    with pytest.raises(ConfigError) as info:
        read_config_data(data)
    assert sorted(re.findall(r"\d+\. `([^`]+)`", str(info.value))) == sorted(
        ["fsdp_config.fsdp_sync_module_states", "fsdp_config.fsdp_flat", "mixed_precision",
         "gpu_ids"])
    with pytest.raises(ConfigError) as info:
        validate({"num_processes": "x", "num_threads": 0, "cpu": "perhaps"}, "flags")
    assert "3 settings" in str(info.value) and "`num_threads` must be >= 1" in str(info.value)


def test_sharding_keys_that_disagree_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"agree with `fsdp_config\.fsdp_sharding_strategy`"):
        read_config_data({"distributed_type": "FSDP", "fsdp_config": {
            "fsdp_sharding_strategy": "FULL_SHARD", "fsdp_reshard_after_forward": False}})
    with pytest.raises(ConfigError, match="fsdp_version 2"):
        read_config_data({"distributed_type": "FSDP", "fsdp_config": {
            "fsdp_version": 2, "fsdp_sharding_strategy": "SHARD_GRAD_OP"}})


def test_sections_another_distributed_type_owns_are_no_ops() -> None:
    config = read_config_data({"distributed_type": "MULTI_GPU", "fsdp_config": {
        "fsdp_sharding_strategy": "NO_SHARD"}, "deepspeed_config": {"zero3_init_flag": True}})
    assert config.settings == {"strategy": "ddp"}
    effects = {note.key: note.effect for note in config.notes}
    assert "only with distributed_type FSDP" in effects["fsdp_config.fsdp_sharding_strategy"]
    assert "only with distributed_type DEEPSPEED" in effects["deepspeed_config.zero3_init_flag"]


# Every key any table knows, in a file where its section is read.
ALL_KEYS = ([(key, {}) for key in accelerate._TOP] +
            [(f"fsdp_config.{key}", {"distributed_type": "FSDP"}) for key in accelerate._FSDP] +
            [(f"deepspeed_config.{key}", {"distributed_type": "DEEPSPEED"})
             for key in accelerate._DEEPSPEED] +
            [(f"fp8_config.{key}", {"mixed_precision": "fp8"}) for key in accelerate._FP8_KEYS] +
            [(f"dynamo_config.{key}", {}) for key in accelerate._DYNAMO_KEYS] +
            [(f"{section}.{key}", {}) for section in ("mpirun_config", "ipex_config")
             for key in accelerate._SECTION_KEYS[section]] +
            [(f"parallelism_config.{key}", {}) for key in accelerate._PARALLELISM_KEYS] +
            [(section, {}) for section in accelerate._SECTIONS])
BAD_VALUES = ["garbage", -5, 3.7, [1, 2], {"a": 1}, True, "", "NO_SHARD", None]


def _with(key: str, value: Any, base: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"distributed_type": "MULTI_GPU"} | base
    section, _, name = key.partition(".")
    if name:
        inner = data.get(section)
        data[section] = {**(inner if isinstance(inner, dict) else {}), name: value}
    else:
        data[key] = value
    return data


def _read_or_config_error(data: dict[str, Any]) -> None:
    try:
        config = read_config_data(data)
    except ConfigError:
        return
    to_plan_or_config_error(config.settings)


def to_plan_or_config_error(values: dict[str, Any]) -> None:
    with contextlib.suppress(ConfigError):
        to_plan(resolve({}, values, {}))


@pytest.mark.parametrize(("key", "base"), ALL_KEYS, ids=[k for k, _ in ALL_KEYS])
def test_every_key_with_every_bad_value_is_read_or_a_config_error(key: str, base: dict) -> None:
    for value in BAD_VALUES:
        _read_or_config_error(_with(key, value, base))  # never a KeyError or TypeError


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**9) | st.floats(
    allow_nan=False) | st.text(max_size=12) | st.sampled_from(
    ["NO", "FSDP", "FULL_SHARD", "HYBRID_SHARD", "TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP",
     "AO", "TE", "standard", "nvme", "true", "bf16", "fp8", "-1"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3), max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([k for k, _ in ALL_KEYS] + ["distributed_type"]),
                       JSONISH, max_size=6))
def test_any_mix_of_keys_and_values_is_read_or_a_config_error(picks: dict[str, Any]) -> None:
    data: dict[str, Any] = {}
    for key, value in picks.items():
        data = _with(key, value, data) if "." in key else data | {key: value}
    _read_or_config_error(data)


# ---- --dry-run ---------------------------------------------------------------------------

def _dry_run(*argv: str, env: dict[str, str] | None = None) -> str:
    import os

    script = DATA.parent.parent / "conftest.py"  # any existing file: it is not run
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | (env or {})
    done = subprocess.run([sys.executable, "-m", "distlib", "launch", "--dry-run", *argv,
                           str(script)], capture_output=True, text=True, timeout=60,
                          env=environ, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("name", ["fsdp_auto_wrap_sync_prefetch.yaml", "multi_cpu.yaml",
                                  "fsdp_hybrid_shard.yaml", "deepspeed_stage3_nvme.yaml"])
def test_dry_run_has_a_row_for_every_key_of_the_file(name: str) -> None:
    path = DATA / name
    out = _dry_run("--config-file", str(path))
    rows = dict(line.strip().split(": ", 1) for line in out.split("key by key:")[1]
                .split("\n\n")[0].strip().splitlines())
    assert sorted(rows) == sorted(_keys(yaml.safe_load(path.read_text())))
    assert all(" -> " in row for row in rows.values())


def test_dry_run_says_what_became_of_each_key() -> None:
    out = _dry_run("--config-file", str(DATA / "fsdp_auto_wrap_sync_prefetch.yaml"))
    for row in ["fsdp_config.fsdp_sharding_strategy: FULL_SHARD -> fsdp_hybrid_shard=false, "
                "fsdp_reshard_after_forward=true",
                "fsdp_config.fsdp_use_orig_params: true -> no-op (FSDP2 always keeps the "
                "original parameters)",
                "fsdp_config.fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP -> "
                "fsdp_wrap_classes=auto (the classes the model lists in _no_split_modules)",
                "fsdp_config.fsdp_sync_module_states: true -> fsdp_sync_module_states=true",
                "fsdp_config.fsdp_forward_prefetch: true -> fsdp_forward_prefetch=true",
                "fsdp_config.fsdp_ignored_modules: null -> no-op",
                "fsdp_config.fsdp_backward_prefetch: BACKWARD_PRE -> no-op (FSDP2 always"]:
        assert row in out, row
    table = {line.split()[0]: line for line in out.split("\n\n")[0].splitlines()}
    assert table["fsdp_sync_module_states"].split()[1] == "True"
    assert table["fsdp_wrap_classes"].split()[1] == "auto"
    hybrid = _dry_run("--config-file", str(DATA / "fsdp_hybrid_shard.yaml"))
    assert ("fsdp_config.fsdp_sharding_strategy: HYBRID_SHARD -> fsdp_hybrid_shard=true, "
            "fsdp_reshard_after_forward=true") in hybrid


def test_dry_run_of_a_distlib_file_lists_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("num_processes: 2\ncpu: true\nfsdp_wrap_classes: auto\nstrategy: fsdp\n")
    out = _dry_run("--config-file", str(path))
    assert "(distlib format), key by key:" in out
    for row in ("num_processes: 2 -> num_processes=2", "cpu: true -> cpu=true",
                "fsdp_wrap_classes: auto -> fsdp_wrap_classes=auto"):
        assert row in out


# ---- threads per rank --------------------------------------------------------------------

def test_num_threads_flag_alias_plan_and_dry_run(capsys, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    script = str(DATA.parent.parent / "conftest.py")
    for flag in ("--num-threads", "--num_threads", "--num-cpu-threads-per-process",
                 "--num_cpu_threads_per_process"):
        assert main(["launch", "--dry-run", "--cpu", "--num-processes", "2", flag, "3",
                     script]) == 0
        rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
                if line.strip()}
        assert rows["num_threads"][1:] == ["3", "flag"], flag
    assert to_plan(resolve({"num_threads": 5}, {}, {})).num_threads == 5
    assert to_plan(resolve({}, read_config_data({"num_threads": 2}).settings, {})
                   ).num_threads == 2
    assert main(["launch", "--dry-run", "--num-threads", "0", script]) == 2
    assert "`num_threads` must be >= 1, but got 0" in capsys.readouterr().err


def test_num_threads_default_is_shown_with_where_it_comes_from(capsys, monkeypatch) -> None:
    script = str(DATA.parent.parent / "conftest.py")
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert main(["launch", "--dry-run", "--cpu", "--num-processes", "2", script]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^num_threads\s+6\s+environment \(OMP_NUM_THREADS\)$", out, re.M)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert main(["launch", "--dry-run", "--cpu", "--num-processes", "2", script]) == 0
    assert re.search(r"^num_threads\s+\d+ \(\d+ cores shared among 2 CPU ranks\)\s+derived$",
                     capsys.readouterr().out, re.M)
    assert main(["launch", "--dry-run", script]) == 0
    assert re.search(r"^num_threads\s+\$OMP_NUM_THREADS, else the machine's cores shared "
                     r"among its CPU ranks; 1 per GPU rank\s+default$",
                     capsys.readouterr().out, re.M)


def test_help_lists_the_new_options() -> None:
    out = subprocess.run([sys.executable, "-m", "distlib", "launch", "--help"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    for word in ("--num-threads", "--num-cpu-threads-per-process", "--fsdp-hybrid-shard",
                 "--fsdp-sync-module-states", "--fsdp-forward-prefetch",
                 "--offload-optimizer-nvme-path", "--zero3-save-16bit-model",
                 "threads each rank's torch uses (default: $OMP_NUM_THREADS, else the",
                 "_no_split_modules"):
        assert word in " ".join(out.split()), word


# ---- the strategy options the files map to ----------------------------------------------

def test_fsdp_auto_wraps_the_models_no_split_modules() -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=8, n_head=2, vocab_size=32,
                                       n_positions=8, bos_token_id=0, eos_token_id=0))
    assert plan_units(model, FSDP(wrap_classes="auto")) == [
        "transformer.h.2", "transformer.h.1", "transformer.h.0"]
    with pytest.raises(StrategyError, match=r"wrap_classes='auto' must find the model's "
                       r"`_no_split_modules`.*Sequential"):
        plan_units(torch.nn.Sequential(torch.nn.Linear(2, 2)), FSDP(wrap_classes="auto"))
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    plain._no_split_modules = []  # type: ignore[assignment]
    assert plan_units(plain, FSDP(wrap_classes="auto")) == []  # as Accelerate: the root only
    with pytest.raises(ValueError, match="'auto' alone"):
        FSDP(wrap_classes=["auto", "Block"])
    with pytest.raises(TypeError, match="sync_module_states"):
        FSDP(sync_module_states="yes")  # type: ignore[arg-type]


def test_deepspeed_nvme_paths_and_16bit_save_reach_its_config() -> None:
    strategy = DeepSpeed(zero_stage=3, offload_optimizer="nvme", offload_param="nvme",
                         offload_optimizer_nvme_path="/nvme/o", offload_param_nvme_path="/nvme/p",
                         gather_16bit_weights_on_save=True)
    zero = plan_config(strategy, fake_env(), has_optimizer=True)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "nvme", "nvme_path": "/nvme/o"}
    assert zero["offload_param"] == {"device": "nvme", "nvme_path": "/nvme/p"}
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    with pytest.raises(ValueError, match="offload_param_nvme_path must come with"):
        DeepSpeed(zero_stage=3, offload_param_nvme_path="/nvme/p")
    plan = to_plan(resolve({}, read_config(str(DATA / "deepspeed_stage3_nvme.yaml")).settings,
                           {}))
    assert plan.strategy_options["offload_param_nvme_path"] == "/local_nvme"
    assert plan.strategy_options["gather_16bit_weights_on_save"] is True


def test_the_tables_cover_every_key_accelerate_knows() -> None:
    """Accelerate's own config class and launcher options: none is left out of the tables."""
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    from accelerate.commands.launch import launch_command_parser

    fields = set(config_args.ClusterConfig.__dataclass_fields__)
    assert fields <= set(accelerate._TOP) | set(accelerate._SECTIONS)
    options = {a.dest for a in launch_command_parser()._actions}
    groups = {"fsdp_": set(accelerate._FSDP), "parallelism_config_": set(
        accelerate._PARALLELISM_KEYS), "dynamo_": set(accelerate._DYNAMO_KEYS),
        "mpirun_": set(accelerate._SECTION_KEYS["mpirun_config"])}
    for prefix, known in groups.items():
        assert {o for o in options if o.startswith(prefix)} <= known, prefix
    fp8 = {o for o in options if o.startswith("fp8_")}
    spellings = fp8 | {o.removeprefix("fp8_") for o in fp8}  # a file may write either
    assert {accelerate._fp8_name(name) for name in spellings} <= set(accelerate._FP8_KEYS)
    deepspeed = {"deepspeed_config_file", "zero_stage", "offload_optimizer_device",
                 "offload_param_device", "offload_optimizer_nvme_path",
                 "offload_param_nvme_path", "gradient_accumulation_steps", "gradient_clipping",
                 "zero3_init_flag", "zero3_save_16bit_model"}
    assert {o for o in options if o.startswith("deepspeed_")} | deepspeed <= set(
        accelerate._DEEPSPEED)
