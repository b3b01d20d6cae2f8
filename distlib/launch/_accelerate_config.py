"""Translate Accelerate's ``default_config.yaml`` into distlib settings (pure, torch-free).

Every key Accelerate writes for a local machine is understood: the ones distlib uses are
translated, the ones with no distlib meaning (TPU pods, dynamo, SageMaker-free extras) are
accepted and ignored, and anything else is an error naming the key and the valid keys.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from distlib.errors import ConfigError

__all__ = ["from_accelerate"]

_TOP = {"mixed_precision": "precision", "use_cpu": "cpu", "num_processes": "num_processes",
        "machine_rank": "machine_rank", "num_machines": "num_machines", "gpu_ids": "gpu_ids",
        "main_process_ip": "main_address", "main_process_port": "main_port",
        "rdzv_backend": "rdzv_backend", "debug": "debug"}
_IGNORED_TOP = {"same_network", "main_training_function", "enable_cpu_affinity",
                "downcast_bf16", "tpu_name", "tpu_zone", "tpu_use_cluster", "tpu_use_sudo",
                "command_file", "commands", "tpu_vm", "tpu_env", "dynamo_config",
                "ipex_config", "mpirun_config", "fp8_config",
                "parallelism_config", "megatron_lm_config", "dynamo_backend"}
_DISTRIBUTED = {"NO": None, "MULTI_CPU": "ddp", "MULTI_GPU": "ddp", "FSDP": "fsdp",
                "DEEPSPEED": "deepspeed", "XLA": "xla", "TPU": "xla"}
_FSDP = {"fsdp_offload_params": "fsdp_cpu_offload",
         "fsdp_activation_checkpointing": "fsdp_activation_checkpointing",
         "fsdp_min_num_params": "fsdp_min_num_params"}
_FSDP_IGNORED = {"fsdp_backward_prefetch", "fsdp_backward_prefetch_policy",
                 "fsdp_forward_prefetch", "fsdp_cpu_ram_efficient_loading",
                 "fsdp_sync_module_states", "fsdp_use_orig_params", "fsdp_version",
                 "fsdp_limit_all_gathers", "fsdp_auto_wrap_policy"}
_FSDP_SHARDING = {"FULL_SHARD": True, "1": True, "SHARD_GRAD_OP": False, "2": False,
                  "NO_SHARD": False, "3": False, "HYBRID_SHARD": True, "4": True,
                  "HYBRID_SHARD_ZERO2": False, "5": False}
_FSDP_STATE = {"FULL_STATE_DICT": "full", "SHARDED_STATE_DICT": "sharded",
               "LOCAL_STATE_DICT": "sharded"}
_DEEPSPEED = {"deepspeed_config_file": "deepspeed_config_file", "zero_stage": "zero_stage",
              "offload_optimizer_device": "offload_optimizer_device",
              "offload_param_device": "offload_param_device",
              "gradient_accumulation_steps": "gradient_accumulation_steps",
              "gradient_clipping": "gradient_clipping"}
_DEEPSPEED_IGNORED = {"zero3_init_flag", "zero3_save_16bit_model", "deepspeed_hostfile",
                      "deepspeed_multinode_launcher", "deepspeed_exclusion_filter",
                      "deepspeed_inclusion_filter", "offload_optimizer_nvme_path",
                      "offload_param_nvme_path", "deepspeed_moe_layer_cls_names"}


def _unknown(where: str, key: str, value: Any, valid: set[str]) -> ConfigError:
    near = difflib.get_close_matches(key, sorted(valid), n=1)
    hint = f" Did you mean `{near[0]}`?" if near else ""
    return ConfigError(f"{where}: `{key}` must be a key Accelerate's config format knows "
                       f"({', '.join(sorted(valid))}), but got `{key}: {value!r}`.{hint}")


def _section(where: str, name: str, data: Any) -> Mapping[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        msg = f"{where}: `{name}` must be a mapping, but got {data!r}."
        raise ConfigError(msg)
    return data


def _fsdp(where: str, data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    valid = set(_FSDP) | _FSDP_IGNORED | {"fsdp_sharding_strategy", "fsdp_reshard_after_forward",
                                          "fsdp_state_dict_type",
                                          "fsdp_transformer_layer_cls_to_wrap"}
    for key, value in data.items():
        if key not in valid:
            raise _unknown(f"{where}: fsdp_config", key, value, valid)
        if key in _FSDP:
            out[_FSDP[key]] = value
        elif key in ("fsdp_sharding_strategy", "fsdp_reshard_after_forward"):
            text = str(value).strip().upper()
            if isinstance(value, bool) or text in ("TRUE", "FALSE"):
                out["fsdp_reshard_after_forward"] = text == "TRUE"
            elif text in _FSDP_SHARDING:
                out["fsdp_reshard_after_forward"] = _FSDP_SHARDING[text]
            else:
                msg = (f"{where}: fsdp_config: `{key}` must be true, false or one of "
                       f"{', '.join(k for k in _FSDP_SHARDING if not k.isdigit())}, but got "
                       f"{value!r}.")
                raise ConfigError(msg)
        elif key == "fsdp_state_dict_type":
            if str(value) not in _FSDP_STATE:
                msg = (f"{where}: fsdp_config: `fsdp_state_dict_type` must be one of "
                       f"{', '.join(_FSDP_STATE)}, but got {value!r}.")
                raise ConfigError(msg)
            out["fsdp_state_dict_type"] = _FSDP_STATE[str(value)]
        elif key == "fsdp_transformer_layer_cls_to_wrap" and value:
            out["fsdp_wrap_classes"] = (",".join(value) if isinstance(value, list)
                                        else str(value))
    return out


def _deepspeed(where: str, data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    valid = set(_DEEPSPEED) | _DEEPSPEED_IGNORED
    for key, value in data.items():
        if key not in valid:
            raise _unknown(f"{where}: deepspeed_config", key, value, valid)
        if key in _DEEPSPEED and value is not None:
            out[_DEEPSPEED[key]] = value
    return out


def from_accelerate(data: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """Translate an Accelerate config mapping into distlib settings (not yet validated).

    Raises:
        ConfigError: an unknown key, a distributed type or compute environment distlib does
            not run, or a malformed section.

    Example:
        >>> from_accelerate({"compute_environment": "LOCAL_MACHINE",
        ...                  "distributed_type": "MULTI_CPU", "mixed_precision": "bf16",
        ...                  "num_processes": 2, "use_cpu": True})
        {'strategy': 'ddp', 'cpu': True, 'precision': 'bf16', 'num_processes': 2}
    """
    env = data.get("compute_environment", "LOCAL_MACHINE")
    if env != "LOCAL_MACHINE":
        msg = (f"{where}: `compute_environment` must be 'LOCAL_MACHINE', but got {env!r}. "
               "distlib launches on machines you can reach (SLURM included), not SageMaker.")
        raise ConfigError(msg)
    kind = str(data.get("distributed_type", "NO"))
    if kind not in _DISTRIBUTED:
        msg = (f"{where}: `distributed_type` must be one of {', '.join(_DISTRIBUTED)}, but got "
               f"{kind!r}. distlib runs CPUs, NVIDIA/AMD GPUs and XLA devices.")
        raise ConfigError(msg)
    out: dict[str, Any] = {}
    if _DISTRIBUTED[kind]:
        out["strategy"] = _DISTRIBUTED[kind]
    if kind == "MULTI_CPU":
        out["cpu"] = True
    valid = set(_TOP) | _IGNORED_TOP | {"compute_environment", "distributed_type",
                                        "fsdp_config", "deepspeed_config"}
    for key, value in data.items():
        if key not in valid:
            raise _unknown(where, key, value, valid)
        if key in _TOP and value is not None:
            if key == "num_processes" and value == -1:
                continue  # Accelerate's "not set"
            out[_TOP[key]] = value
    if kind == "FSDP":
        out.update(_fsdp(where, _section(where, "fsdp_config", data.get("fsdp_config"))))
    if kind == "DEEPSPEED":
        out.update(_deepspeed(where, _section(where, "deepspeed_config",
                                              data.get("deepspeed_config"))))
    return out
