"""Translate Accelerate's config files into distlib settings, key by key (pure, torch-free).

Every key Accelerate's ``ClusterConfig`` knows (top level, ``fsdp_config``,
``deepspeed_config``, ``fp8_config``, ``dynamo_config``, ``mpirun_config``, ``ipex_config``,
``parallelism_config``, ``megatron_lm_config``, the ``tpu_*`` keys) gets exactly one outcome:

- translated: honoured with Accelerate's meaning, as the distlib settings it names;
- no-op: its value means what distlib does anyway (or Accelerate itself does not use it
  under this file's ``distributed_type``), with the reason;
- refused: distlib cannot honour it; the error names the key as written, the value, why,
  and what to do instead.

Nothing is dropped silently: `translate` returns a note for every key it read (the
``--dry-run`` table prints them), and all refused and unknown keys of a file are reported
together in one `ConfigError`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from distlib.env import parse_bool
from distlib.errors import ConfigError

__all__ = ["KeyNote", "Translation", "from_accelerate", "problems_message", "translate",
           "translate_all"]

_DISTRIBUTED = {"NO": None, "MULTI_CPU": "ddp", "MULTI_GPU": "ddp", "FSDP": "fsdp",
                "DEEPSPEED": "deepspeed", "XLA": "xla", "TPU": "xla"}
_NOT_RUN = {"MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU",
            "MULTI_NEURON", "MEGATRON_LM"}


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyNote:
    """What became of one key of a config file.

    ``key`` is dotted as written (``fsdp_config.fsdp_sharding_strategy``); ``outcome`` is
    ``"translated"``, ``"no-op"`` or ``"refused"``; ``effect`` says what distlib does with it.
    """

    key: str
    value: Any
    outcome: str
    effect: str

    def row(self) -> str:
        """``key: value -> effect``, one line of the ``--dry-run`` report."""
        return f"{self.key}: {_show(self.value)} -> {self.effect}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Translation:
    """The distlib settings a file means, which file key each came from, and every note."""

    settings: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    notes: tuple[KeyNote, ...] = ()


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return str(value) if not isinstance(value, str) else value


def _truth(value: Any) -> bool | None:
    """A YAML boolean or a true/false string (`distlib.env.parse_bool`); None for anything else."""
    return parse_bool(value)


class _Reader:
    """Collects the settings, notes and problems of one file."""

    def __init__(self, where: str) -> None:
        self.settings: dict[str, Any] = {}
        self.origins: dict[str, str] = {}
        self.notes: list[KeyNote] = []
        self.problems: list[str] = []

    def translate(self, key: str, value: Any, effect: str = "", **settings: Any) -> None:
        self.put(key, value, settings, effect)

    def put(self, key: str, value: Any, settings: Mapping[str, Any], effect: str = "") -> None:
        for name, got in settings.items():
            if name in self.settings and self.settings[name] != got:
                self.refuse(key, value, f"agree with `{self.origins[name]}` (both set {name})",
                            f"`{self.origins[name]}` already means {name}="
                            f"{_show(self.settings[name])}; keep one of the two keys.")
                return
        self.settings.update(settings)
        self.origins.update({name: key for name in settings})
        text = ", ".join(f"{name}={_show(got)}" for name, got in settings.items())
        self.notes.append(KeyNote(key=key, value=value, outcome="translated",
                                  effect=(f"{text} ({effect})" if effect else text) or effect))

    def noop(self, key: str, value: Any, why: str) -> None:
        self.notes.append(KeyNote(key=key, value=value, outcome="no-op", effect=f"no-op ({why})"))

    def refuse(self, key: str, value: Any, rule: str, fix: str) -> None:
        self.notes.append(KeyNote(key=key, value=value, outcome="refused",
                                  effect=f"refused: must {rule}"))
        self.problems.append(f"`{key}` must {rule}, but got {value!r}. {fix}")

    def unknown(self, key: str, value: Any, valid: list[str]) -> None:
        name = key.rpartition(".")[2]
        near = difflib.get_close_matches(name, valid, n=1)
        hint = f"Did you mean `{near[0]}`?" if near else "Remove it."
        self.notes.append(KeyNote(key=key, value=value, outcome="refused",
                                  effect="refused: unknown key"))
        self.problems.append(f"`{key}` must be a key Accelerate's config format knows "
                             f"({', '.join(valid)}), but got `{name}: {value!r}`. {hint}")


Handler = Callable[[_Reader, str, Any, Mapping[str, Any]], None]


def _plain(setting: str, unset: Any = None, unset_why: str = "not set: distlib's default"
           ) -> Handler:
    """A key that is one distlib setting; ``unset`` (and None) mean distlib's default."""
    def handle(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
        if value is None or (unset is not None and value == unset):
            r.noop(key, value, unset_why)
        else:
            r.put(key, value, {setting: value})
    return handle


def _flag(setting: str | None, false_why: str, true_rule: str, true_fix: str,
          true_setting: bool = False) -> Handler:
    """A boolean key: false (or null) is a no-op; true is honoured as ``setting`` or refused."""
    def handle(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
        truth = False if value is None else _truth(value)
        if truth is None:
            r.refuse(key, value, "be true or false", "Write true or false.")
        elif not truth:
            r.noop(key, value, false_why)
        elif true_setting and setting:
            r.put(key, value, {setting: True})
        else:
            r.refuse(key, value, true_rule, true_fix)
    return handle


def _noop(why: str) -> Handler:
    def handle(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
        r.noop(key, value, why)
    return handle


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, tuple, dict))
                             and (len(value) == 0 or value == "none"))


def _empty_or(rule: str, fix: str, why: str = "not set") -> Handler:
    """A key that is a no-op when empty / unset and refused otherwise."""
    def handle(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
        if _is_empty(value):
            r.noop(key, value, why)
        else:
            r.refuse(key, value, rule, fix)
    return handle


# ---- top level --------------------------------------------------------------------------

def _compute_environment(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    if value == "LOCAL_MACHINE":
        r.noop(key, value, "distlib launches on machines you can reach, SLURM included")
    else:
        r.refuse(key, value, "be 'LOCAL_MACHINE'", "distlib does not start SageMaker jobs; run "
                 "`distlib launch` on the machines themselves.")


def _kind(data: Mapping[str, Any]) -> str:
    value = data.get("distributed_type", "NO")
    return "NO" if value is False else str(value)  # YAML 1.1 reads a bare NO as false


def _distributed_type(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    kind = _kind(data)
    if kind in _NOT_RUN or kind not in _DISTRIBUTED:
        r.refuse(key, value, f"be one of {', '.join(_DISTRIBUTED)}",
                 "distlib runs CPUs, NVIDIA/AMD GPUs (MULTI_GPU, FSDP, DEEPSPEED) and XLA "
                 "devices; Megatron-LM is not one of its engines.")
    elif kind == "NO":
        r.noop(key, value, "strategy chosen in each rank: single for one rank")
    elif kind == "MULTI_CPU":
        r.translate(key, value, "DDP over gloo; distlib starts every CPU rank itself",
                    strategy="ddp", cpu=True)
    else:
        r.translate(key, value, strategy=_DISTRIBUTED[kind])


def _use_cpu(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    truth = _truth(value)
    if _kind(data) == "MULTI_CPU" and truth is False:
        r.noop(key, value, "distributed_type MULTI_CPU runs on CPUs")
    elif value is None:
        r.noop(key, value, "not set: distlib's default")
    else:
        r.translate(key, value, cpu=value)


def _num_processes(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    if value is None or value == -1:
        r.noop(key, value, "not set: the visible GPUs of each machine, else 1")
    else:
        r.translate(key, value, num_processes=value)


def _main_training_function(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    if _kind(data) not in ("XLA", "TPU"):
        r.noop(key, value, "Accelerate reads it only for XLA/TPU and notebook launches")
    elif value in (None, "main"):
        r.noop(key, value, "distlib runs the script itself, which ends by calling main()")
    else:
        r.refuse(key, value, "be 'main' under XLA", f"distlib runs the script, not a named "
                 f"function: call {value}() at the end of the script and drop the key.")


def _downcast_bf16(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    if value in (None, False, "no", "false"):
        r.noop(key, value, "no downcasting, as distlib does")
    else:
        r.refuse(key, value, "be 'no'", "distlib does not set XLA_USE_BF16/XLA_DOWNCAST_BF16; "
                 "use mixed_precision: bf16, or set the variable yourself before launching.")


def _tpu_use_cluster(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    if _truth(value) is True:
        r.refuse(key, value, "be false", "distlib does not start TPU pods over gcloud ssh; run "
                 "`distlib launch` on each TPU VM (one launcher per machine).")
    elif value is None or _truth(value) is False:
        r.noop(key, value, "no TPU-pod launch")
    else:
        r.refuse(key, value, "be true or false", "Write true or false.")


_TPU_POD = _noop("read only by `accelerate tpu-config` and TPU-pod launches, not by a launch "
                 "on this machine")


def _dynamo_backend_top(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    _dynamo(r, key, {"dynamo_backend": value}, data, prefix=key)


def _fp16_top(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    truth = _truth(value)
    if truth is None:
        r.refuse(key, value, "be true or false", "Write mixed_precision: fp16 instead.")
    elif not truth or "mixed_precision" in data:
        r.noop(key, value, "an old spelling; mixed_precision decides" if truth else
               "fp16 off")
    else:
        r.translate(key, value, "Accelerate's old spelling of mixed_precision: fp16",
                    precision="fp16")


_TOP: dict[str, Handler] = {
    "compute_environment": _compute_environment,
    "distributed_type": _distributed_type,
    "mixed_precision": _plain("precision"),
    "use_cpu": _use_cpu,
    "debug": _plain("debug"),
    "num_processes": _num_processes,
    "machine_rank": _plain("machine_rank"),
    "num_machines": _plain("num_machines"),
    "gpu_ids": _plain("gpu_ids"),
    "main_process_ip": _plain("main_address"),
    "main_process_port": _plain("main_port"),
    "rdzv_backend": _plain("rdzv_backend"),
    "same_network": _noop("machine 0's address and port are the rendezvous endpoint either "
                          "way"),
    "main_training_function": _main_training_function,
    "enable_cpu_affinity": _flag(None, "no CPU affinity, as distlib does", "be false",
                                 "distlib does not pin ranks to NUMA nodes; drop the key, or "
                                 "launch a wrapper with --no-python that calls numactl."),
    "downcast_bf16": _downcast_bf16,
    "tpu_name": _TPU_POD, "tpu_zone": _TPU_POD, "tpu_use_sudo": _TPU_POD, "tpu_vm": _TPU_POD,
    "tpu_env": _TPU_POD, "commands": _TPU_POD, "command_file": _TPU_POD,
    "tpu_use_cluster": _tpu_use_cluster,
    "dynamo_backend": _dynamo_backend_top,
    "fp16": _fp16_top,
}
_SECTIONS = ("fsdp_config", "deepspeed_config", "fp8_config", "dynamo_config",
             "mpirun_config", "ipex_config", "parallelism_config", "megatron_lm_config")


# ---- fsdp_config ------------------------------------------------------------------------

_SHARDING = {"FULL_SHARD": (False, True), "SHARD_GRAD_OP": (False, False),
             "HYBRID_SHARD": (True, True), "HYBRID_SHARD_ZERO2": (True, False)}
_SHARDING_NUMBERS = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD",
                     "4": "HYBRID_SHARD", "5": "HYBRID_SHARD_ZERO2"}
_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
_STATE_DICT = {"FULL_STATE_DICT": "full", "SHARDED_STATE_DICT": "sharded"}
_ACCELERATE_MIN_NUM_PARAMS = 100_000_000  # `accelerate launch --fsdp_min_num_params` default


def _fsdp_key(name: str) -> str:
    """Accelerate prefixes ``fsdp_`` to fsdp_config keys written without it."""
    return name if name.startswith("fsdp_") else "fsdp_" + name


def _fsdp_get(data: Mapping[str, Any], name: str) -> Any:
    section = data.get("fsdp_config")
    if not isinstance(section, Mapping):
        return None
    for key, value in section.items():
        if _fsdp_key(str(key)) == name:
            return value
    return None


def _policy(data: Mapping[str, Any]) -> str:
    return str(_fsdp_get(data, "fsdp_auto_wrap_policy") or "NO_WRAP").upper()


def _sharding(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    truth = _truth(value)
    if truth is not None and key.endswith("reshard_after_forward"):
        r.translate(key, value, fsdp_reshard_after_forward=truth)
        return
    text = _SHARDING_NUMBERS.get(str(value).strip(), str(value).strip().upper())
    version2 = str(_fsdp_get(data, "fsdp_version")) == "2"
    if version2 and key.endswith("sharding_strategy") and text != "FULL_SHARD":
        r.refuse(key, value, "be FULL_SHARD (or absent) with fsdp_version 2", "Accelerate's "
                 "FSDP2 ignores fsdp_sharding_strategy; write fsdp_reshard_after_forward: false "
                 "for SHARD_GRAD_OP, or drop fsdp_version: 2 for HYBRID_SHARD.")
    elif version2 and key.endswith("sharding_strategy"):
        r.noop(key, value, "FSDP2 reshards after forward by default, which is FULL_SHARD")
    elif text == "NO_SHARD":
        r.refuse(key, value, "shard (FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD, "
                 "HYBRID_SHARD_ZERO2)", "NO_SHARD is plain data parallelism: use "
                 "distributed_type: MULTI_GPU (or MULTI_CPU), which runs DDP.")
    elif text in _SHARDING:
        hybrid, reshard = _SHARDING[text]
        why = ("HSDP: replicate across machines, shard within each" if hybrid else "")
        r.translate(key, value, why, fsdp_hybrid_shard=hybrid,
                    fsdp_reshard_after_forward=reshard)
    else:
        r.refuse(key, value, f"be true, false or one of {', '.join([*_SHARDING, 'NO_SHARD'])}",
                 "FULL_SHARD frees gathered parameters after forward; SHARD_GRAD_OP keeps "
                 "them until backward.")


def _auto_wrap_policy(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    policy = _policy(data)
    if policy not in _POLICIES:
        r.refuse(key, value, f"be one of {', '.join(_POLICIES)}", "Pick how modules become "
                 "FSDP units.")
    elif policy == "NO_WRAP":
        r.noop(key, value, "only the root is one FSDP unit, as distlib does without classes")
    elif policy == "SIZE_BASED_WRAP":
        if _fsdp_get(data, "fsdp_min_num_params") is None:
            r.translate(key, value, "Accelerate's default size when fsdp_min_num_params is "
                        "unset", fsdp_min_num_params=_ACCELERATE_MIN_NUM_PARAMS)
        else:
            r.noop(key, value, "wraps by size: see fsdp_min_num_params")
    elif _fsdp_get(data, "fsdp_transformer_layer_cls_to_wrap"):
        r.noop(key, value, "wraps by class: see fsdp_transformer_layer_cls_to_wrap")
    else:
        r.translate(key, value, "the classes the model lists in _no_split_modules",
                    fsdp_wrap_classes="auto")


def _layer_classes(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    if _policy(data) != "TRANSFORMER_BASED_WRAP":
        r.noop(key, value, "Accelerate reads it only with TRANSFORMER_BASED_WRAP")
    elif value in (None, "", []):
        r.noop(key, value, "no classes: the model's _no_split_modules, see "
               "fsdp_auto_wrap_policy")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        r.translate(key, value, fsdp_wrap_classes=",".join(value))
    elif isinstance(value, str):
        r.translate(key, value, fsdp_wrap_classes=value)
    else:
        r.refuse(key, value, "be class names (a string, comma-separated, or a list)",
                 "E.g. fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer.")


def _min_num_params(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    if _policy(data) != "SIZE_BASED_WRAP":
        r.noop(key, value, "Accelerate reads it only with SIZE_BASED_WRAP")
    else:
        r.translate(key, value, fsdp_min_num_params=value)


def _state_dict_type(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    if value is None:
        r.noop(key, value, "not set: sharded checkpoints")
    elif str(value) in _STATE_DICT:
        r.translate(key, value, fsdp_state_dict_type=_STATE_DICT[str(value)])
    else:
        r.refuse(key, value, f"be one of {', '.join(_STATE_DICT)}", "LOCAL_STATE_DICT is "
                 "FSDP1's flat-parameter layout, which FSDP2 has no more; use "
                 "SHARDED_STATE_DICT.")


def _fsdp_version(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    if str(value) in ("1", "2", "None"):
        r.noop(key, value, "distlib runs FSDP2 (fully_shard) for 1 and 2; the keys of both "
               "versions are read with their Accelerate meaning")
    else:
        r.refuse(key, value, "be 1 or 2", "FSDP versions are 1 and 2 (distlib runs FSDP2).")


def _backward_prefetch(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    if value is None or str(value).upper() == "BACKWARD_PRE":
        r.noop(key, value, "FSDP2 always prefetches the next unit's all-gather before its "
               "backward, which is BACKWARD_PRE")
    else:
        r.refuse(key, value, "be BACKWARD_PRE (or unset)", "FSDP2 prefetches before each "
                 "unit's backward and has no BACKWARD_POST or NO_PREFETCH; write BACKWARD_PRE.")


def _use_orig_params(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    truth = True if value is None else _truth(value)
    if truth:
        r.noop(key, value, "FSDP2 always keeps the original parameters")
    else:
        r.refuse(key, value, "be true", "FSDP2 always keeps the original parameters (one "
                 "DTensor each, never a flat parameter); write true.")



_FSDP: dict[str, Handler] = {
    "fsdp_version": _fsdp_version,
    "fsdp_sharding_strategy": _sharding,
    "fsdp_reshard_after_forward": _sharding,
    "fsdp_offload_params": _plain("fsdp_cpu_offload"),
    "fsdp_auto_wrap_policy": _auto_wrap_policy,
    "fsdp_transformer_layer_cls_to_wrap": _layer_classes,
    "fsdp_min_num_params": _min_num_params,
    "fsdp_state_dict_type": _state_dict_type,
    "fsdp_activation_checkpointing": _plain("fsdp_activation_checkpointing"),
    "fsdp_activation_checkpointing_offload": _flag(
        None, "activations are recomputed, not offloaded", "be false",
        "distlib recomputes activations (fsdp_activation_checkpointing) but does not offload "
        "them to the CPU; drop the key."),
    "fsdp_sync_module_states": _flag("fsdp_sync_module_states", "ranks keep their own "
                                     "initial weights", "", "", true_setting=True),
    "fsdp_forward_prefetch": _flag("fsdp_forward_prefetch", "FSDP2's implicit forward "
                                   "prefetch only", "", "", true_setting=True),
    "fsdp_backward_prefetch": _backward_prefetch,
    "fsdp_backward_prefetch_policy": _backward_prefetch,
    "fsdp_use_orig_params": _use_orig_params,
    "fsdp_cpu_ram_efficient_loading": _flag(
        None, "every rank reads the checkpoint itself, only its own shards", "be false",
        "distlib cannot make transformers load on rank 0 only (it decides that before the "
        "process group exists); instead build the model under dl.init_empty_weights(), "
        "dl.wrap it, then dl.load_checkpoint(model, folder) reads only each rank's shards "
        "(docs/big_training.md). Set it to false; with fsdp_sync_module_states: true every "
        "rank still starts from rank 0's weights."),
    "fsdp_ignored_modules": _empty_or("be null", "distlib shards every module; drop the key, "
                                      "or keep such modules outside the wrapped model.",
                                      why="no module left unsharded, as distlib does"),
    "fsdp_limit_all_gathers": _noop("FSDP2 always bounds the all-gathers in flight"),
}




# ---- deepspeed_config -------------------------------------------------------------------

def _multinode_launcher(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    machines = str(data.get("num_machines", 1)) not in ("1", "None")
    if value == "standard" or (value is None and not machines):
        r.noop(key, value, "torch's launcher on each machine, which is what distlib runs")
    else:
        r.refuse(key, value, "be 'standard'", "distlib starts one launcher per machine itself "
                 "(torch's elastic agent); run `distlib launch` on every machine, or under "
                 "srun, instead of pdsh/openmpi/mvapich/slurm.")


def _zero3_init(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    _flag(None, "the model is built whole, then partitioned at wrap", "be false",
          "distlib does not build the model inside deepspeed.zero.Init: set it to false (ZeRO-3 "
          "partitions the model at dl.wrap), or construct the model under "
          "`with deepspeed.zero.Init():` in your script.")(r, key, value, data)


def _nvme(setting: str) -> Handler:
    def handle(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
        if value in (None, "none"):
            r.noop(key, value, "no NVMe offload folder")
        else:
            r.put(key, value, {setting: value})
    return handle


_HOSTS_FIX = ("distlib starts one launcher per machine (run `distlib launch` on each, or "
              "under srun); it does not read DeepSpeed hostfiles.")

_DEEPSPEED: dict[str, Handler] = {
    "deepspeed_config_file": _plain("deepspeed_config_file"),
    "zero_stage": _plain("zero_stage"),
    "offload_optimizer_device": _plain("offload_optimizer_device"),
    "offload_param_device": _plain("offload_param_device"),
    "offload_optimizer_nvme_path": _nvme("offload_optimizer_nvme_path"),
    "offload_param_nvme_path": _nvme("offload_param_nvme_path"),
    "gradient_accumulation_steps": _plain("gradient_accumulation_steps"),
    "gradient_clipping": _plain("gradient_clipping"),
    "zero3_init_flag": _zero3_init,
    "zero3_save_16bit_model": _plain("zero3_save_16bit_model"),
    "deepspeed_hostfile": _empty_or("be unset", _HOSTS_FIX),
    "deepspeed_inclusion_filter": _empty_or("be unset", _HOSTS_FIX),
    "deepspeed_exclusion_filter": _empty_or("be unset", _HOSTS_FIX),
    "deepspeed_multinode_launcher": _multinode_launcher,
    "deepspeed_moe_layer_cls_names": _empty_or(
        "be unset", "call deepspeed.utils.set_z3_leaf_modules(model, [YourMoEBlock]) in the "
        "script before dl.wrap."),
}


# ---- fp8_config, dynamo_config, mpirun_config, ipex_config, parallelism, megatron --------

_TE_RECIPE = {"fp8_format": "HYBRID", "amax_history_len": 1024, "amax_compute_algo":
              "most_recent", "margin": 0, "interval": 1, "override_linear_precision": None,
              "use_autocast_during_eval": False, "opt_level": "O2"}


def _fp8_backend(data: Mapping[str, Any]) -> str:
    section = data.get("fp8_config")
    if not isinstance(section, Mapping):
        return "AO"
    value = section.get("backend", section.get("fp8_backend"))
    return "AO" if value is None else str(value).upper().replace("-", "")


def _fp8_name(name: str) -> str:
    """Accelerate accepts fp8_config keys with or without their ``fp8_`` prefix."""
    if name in _FP8_KEYS:
        return name
    return "fp8_" + name if "fp8_" + name in _FP8_KEYS else name.removeprefix("fp8_")


def _fp8(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
    name = _fp8_name(key.rpartition(".")[2])
    if str(data.get("mixed_precision")) != "fp8":
        r.noop(key, value, "read only with mixed_precision: fp8")
        return
    backend = _fp8_backend(data)
    if name == "backend":
        if backend == "AO":
            r.noop(key, value, "torchao float8 training, which is distlib's fp8")
        else:
            r.refuse(key, value, "be AO", "distlib's fp8 is torchao's float8 training, not "
                     "TransformerEngine or MS-AMP; write backend: AO (or drop fp8_config).")
    elif name in ("pad_inner_dim", "enable_fsdp_float8_all_gather"):
        if _truth(value) is False:
            r.noop(key, value, "as distlib's fp8 (layers whose sizes are not multiples of 16 "
                   "stay in high precision)")
        else:
            r.refuse(key, value, "be false", "distlib converts with torchao's default "
                     "Float8LinearConfig (no padding, no float8 all-gather); write false.")
    elif backend == "AO":
        r.noop(key, value, "a TransformerEngine/MS-AMP recipe option; the AO backend has none")
    elif value == _TE_RECIPE.get(name, object()):
        r.noop(key, value, "Accelerate's default")
    else:
        r.refuse(key, value, "be unset", "It is a TransformerEngine/MS-AMP recipe option, and "
                 "distlib's fp8 is torchao's; drop it.")


_FP8_KEYS = ["backend", "pad_inner_dim", "enable_fsdp_float8_all_gather", *_TE_RECIPE]
_DYNAMO_KEYS = ["dynamo_backend", "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic",
                "dynamo_use_regional_compilation"]


def _dynamo(r: _Reader, key: str, section: Mapping[str, Any], data: Mapping[str, Any],
            prefix: str = "dynamo_config") -> None:
    """The whole dynamo section at once: it means one torch.compile call, one problem."""
    values = {_dynamo_name(str(k)): v for k, v in section.items()}
    backend = str(values.get("dynamo_backend") or "NO")
    written = {name: prefix if prefix != "dynamo_config" else f"{prefix}.{name}"
               for name in section}
    for name, value in section.items():
        if _dynamo_name(str(name)) not in _DYNAMO_KEYS:
            r.unknown(written[name], value, _DYNAMO_KEYS)
        elif backend.upper() == "NO":
            r.noop(written[name], value, "no compilation, as distlib does")
        elif _dynamo_name(str(name)) != "dynamo_backend":
            r.notes.append(KeyNote(key=written[name], value=value, outcome="refused",
                                   effect="refused: part of the compile setting (see "
                                   "dynamo_backend)"))
    if backend.upper() == "NO":
        return
    options = {"backend": backend.lower(), "mode": values.get("dynamo_mode") or "default",
               "fullgraph": bool(values.get("dynamo_use_fullgraph")),
               "dynamic": bool(values.get("dynamo_use_dynamic"))}
    others = [written[n] for n in section if _dynamo_name(str(n)) in _DYNAMO_KEYS[1:]]
    also = f"; this covers {', '.join(others)} too" if others else ""
    backend_key = next(written[n] for n in section if _dynamo_name(str(n)) == "dynamo_backend")
    r.refuse(backend_key, values["dynamo_backend"], f"be NO (distlib compiles only when the "
             f"script asks{also})", f"Pass compile={options!r} to dl.wrap in the script, "
             "and drop the dynamo settings.")


def _dynamo_name(name: str) -> str:
    return name if name.startswith("dynamo_") else "dynamo_" + name


_MPIRUN_FIX = ("distlib starts ranks with torch's elastic agent, not mpirun: run `distlib "
               "launch` on each machine (or under srun) with --num-machines and "
               "--machine-rank.")
_IPEX_FIX = ("distlib does not call intel_extension_for_pytorch.optimize; call it in the "
             "script, or drop the key.")


def _refuse_all(rule: str, fix: str, noop_when: Callable[[Any], bool]) -> Handler:
    def handle(r: _Reader, key: str, value: Any, data: Mapping[str, Any]) -> None:
        if noop_when(value):
            r.noop(key, value, "Accelerate's default, what distlib does")
        else:
            r.refuse(key, value, rule, fix)
    return handle


_MEGATRON_FIX = "distlib does not run Megatron-LM; use FSDP or DEEPSPEED."

_SECTION_KEYS: dict[str, dict[str, Handler]] = {
    "fsdp_config": _FSDP,
    "deepspeed_config": _DEEPSPEED,
    "fp8_config": {name: _fp8 for name in _FP8_KEYS},
    "mpirun_config": {"mpirun_hostfile": _empty_or("be unset", _MPIRUN_FIX),
                      "mpirun_ccl": _noop("unused by Accelerate's launcher")},
    "ipex_config": {"ipex": _flag(None, "no IPEX, as distlib does", "be false", _IPEX_FIX),
                    "use_xpu": _flag(None, "no XPU", "be false", "distlib runs CPUs, "
                                     "NVIDIA/AMD GPUs and XLA devices, not Intel XPUs.")},
}
_PARALLELISM_KEYS = ["parallelism_config_dp_replicate_size", "parallelism_config_dp_shard_size",
                     "parallelism_config_tp_size", "parallelism_config_cp_size",
                     "parallelism_config_cp_backend", "parallelism_config_cp_comm_strategy",
                     "parallelism_config_sp_size", "parallelism_config_sp_backend",
                     "parallelism_config_sp_seq_length",
                     "parallelism_config_sp_seq_length_is_variable",
                     "parallelism_config_sp_attn_implementation"]


# parallelism_config's axis sizes -> distlib's mesh settings (Accelerate's ParallelismConfig:
# an absent size is 1, and the product must be the number of processes).
_MESH_SIZES = {f"parallelism_config_{axis}_size": f"{axis}_size"
               for axis in ("dp_replicate", "dp_shard", "cp", "tp")}


def _parallelism(r: _Reader, section: Mapping[str, Any]) -> None:
    """``parallelism_config``: the four sizes are the mesh, as Accelerate means them."""
    sizes = {key: section.get(key) for key in _MESH_SIZES}
    given = {k: v for k, v in sizes.items() if v is not None}
    ones = all(_as_int(v) == 1 for v in given.values())
    # Accelerate's default for an absent size is 1 (never inferred): the first size read
    # says so for the others.
    absent = {_MESH_SIZES[k]: 1 for k in _MESH_SIZES if sizes[k] is None}
    for key, value in section.items():
        written = f"parallelism_config.{key}"
        if key in _MESH_SIZES and ones:
            r.noop(written, value, "every size 1: Accelerate's pure data parallelism, "
                   "distlib's default mesh")
        elif key in _MESH_SIZES and value is not None:
            why = (f"absent {', '.join(absent)}: Accelerate's default 1" if absent else "")
            r.put(written, value, {_MESH_SIZES[key]: value} | absent, why)
            absent = {}
        elif key in _MESH_SIZES:
            r.noop(written, value, "not set: Accelerate's default 1")
        elif key not in _PARALLELISM_KEYS:
            r.unknown(written, value, _PARALLELISM_KEYS)
        else:
            _parallelism_option(r, written, key, value, section)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if text.isdigit() else None


def _parallelism_option(r: _Reader, key: str, name: str, value: Any,
                        section: Mapping[str, Any]) -> None:
    """The keys of parallelism_config beside the sizes: Accelerate's defaults or refused."""
    cp = _as_int(section.get("parallelism_config_cp_size", 1)) or 1
    sp = section.get("parallelism_config_sp_size")
    if name == "parallelism_config_cp_comm_strategy":
        if cp <= 1 or value in (None, "allgather"):
            r.noop(key, value, "torch's all-gather rotation, what distlib's context parallel "
                   "uses" if cp > 1 else "Accelerate reads it only with cp_size > 1")
        else:
            r.refuse(key, value, "be 'allgather'", "distlib's context parallelism uses "
                     "torch's default all-gather rotation of the key/value shards; drop the key.")
    elif name == "parallelism_config_cp_backend":
        if value in (None, "torch"):
            r.noop(key, value, "torch's context parallelism, which is distlib's")
        else:
            r.refuse(key, value, "be 'torch'", "distlib's context parallelism is torch's "
                     "(torch.distributed.tensor.experimental.context_parallel); for DeepSpeed's "
                     "sequence parallelism there is no distlib counterpart. Drop the key.")
    elif name == "parallelism_config_sp_size":
        if value is None or _as_int(value) == 1:
            r.noop(key, value, "no DeepSpeed sequence parallelism, as distlib does")
        else:
            r.refuse(key, value, "be 1", "distlib does not run DeepSpeed's (ALST/Ulysses) "
                     "sequence parallelism; split the sequence with "
                     "parallelism_config_cp_size (torch's context parallelism) instead.")
    elif sp is None or _as_int(sp) == 1:
        r.noop(key, value, "Accelerate reads it only with sp_size > 1")
    else:
        r.notes.append(KeyNote(key=key, value=value, outcome="refused",
                               effect="refused: part of sequence parallelism (see sp_size)"))


def _unused_section(kind: str, section: str) -> str | None:
    """Why Accelerate ignores a whole section under this distributed_type (None: it reads it)."""
    owner = {"fsdp_config": "FSDP", "deepspeed_config": "DEEPSPEED"}.get(section)
    if owner and kind != owner:
        return f"Accelerate reads it only with distributed_type {owner}, not {kind}"
    return None


def _read_section(r: _Reader, name: str, section: Any, data: Mapping[str, Any]) -> None:
    if section is None or section == {}:
        r.noop(name, section, "empty")
        return
    if not isinstance(section, Mapping):
        r.refuse(name, section, "be a mapping of key: value", f"Write {name}: {{}} or nest "
                 "its keys under it.")
        return
    if name == "dynamo_config":
        _dynamo(r, name, section, data)
        return
    if name == "parallelism_config":
        _parallelism(r, section)
        return
    if name == "megatron_lm_config":
        for key, value in section.items():
            r.refuse(f"{name}.{key}", value, f"be absent (the whole {name} section)",
                     _MEGATRON_FIX)
        return
    unused = _unused_section(_kind(data), name)
    handlers = _SECTION_KEYS[name]
    for key, value in section.items():
        written = f"{name}.{key}"
        lookup = _fsdp_key(str(key)) if name == "fsdp_config" else str(key)
        if name == "fp8_config":
            lookup = _fp8_name(lookup)
        if lookup not in handlers:
            r.unknown(written, value, sorted(handlers))
        elif unused:
            r.noop(written, value, unused)
        else:
            handlers[lookup](r, written, value, data)


def translate(data: Mapping[str, Any], where: str = "config") -> Translation:
    """Read an Accelerate config mapping key by key into distlib settings and notes.

    Returns:
        A `Translation`: the (not yet validated) distlib settings, the file key each setting
        came from, and one `KeyNote` per key read.

    Raises:
        ConfigError: listing every unknown key and every key distlib cannot honour, each
            with its value, the reason and what to do instead.

    Example:
        >>> t = translate({"distributed_type": "FSDP", "fsdp_config": {
        ...     "fsdp_sharding_strategy": "HYBRID_SHARD", "fsdp_use_orig_params": True}})
        >>> t.settings
        {'strategy': 'fsdp', 'fsdp_hybrid_shard': True, 'fsdp_reshard_after_forward': True}
        >>> print(t.notes[-1].row())
        fsdp_config.fsdp_use_orig_params: true -> no-op (FSDP2 always keeps the original parameters)
    """
    translation, problems = translate_all(data)
    if problems:
        raise ConfigError(problems_message(where, problems))
    return translation


def translate_all(data: Mapping[str, Any]) -> tuple[Translation, list[str]]:
    """`translate` without raising: the translation of what could be read, and every problem.

    Example:
        >>> _, problems = translate_all({"distributed_type": "FSDP", "dynamo_config": {
        ...     "dynamo_backend": "INDUCTOR"}, "fsdp_config": {"fsdp_sync": True}})
        >>> [p.split()[0] for p in problems]
        ['`dynamo_config.dynamo_backend`', '`fsdp_config.fsdp_sync`']
    """
    r = _Reader("")
    for key, value in data.items():
        if key in _SECTIONS:
            _read_section(r, key, value, data)
        elif key in _TOP:
            _TOP[key](r, key, value, data)
        else:
            r.unknown(str(key), value, sorted([*_TOP, *_SECTIONS]))
    translation = Translation(settings=r.settings, origins=r.origins, notes=tuple(r.notes))
    return translation, r.problems


def problems_message(where: str, problems: list[str]) -> str:
    """One message for one problem, or a numbered list for several."""
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    lines = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
    return f"{where}: {len(problems)} settings cannot be used as written:\n{lines}"


def from_accelerate(data: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """Translate an Accelerate config mapping into distlib settings (not yet validated).

    Raises:
        ConfigError: every unknown or refused key (see `translate`).

    Example:
        >>> from_accelerate({"compute_environment": "LOCAL_MACHINE",
        ...                  "distributed_type": "MULTI_CPU", "mixed_precision": "bf16",
        ...                  "num_processes": 2, "use_cpu": True})
        {'strategy': 'ddp', 'cpu': True, 'precision': 'bf16', 'num_processes': 2}
    """
    return translate(data, where).settings
