"""Launcher settings: flags vs config precedence, Accelerate configs, bad configs, the
questionnaire, ``config default``, ``--dry-run`` and the CLI spelling rules (no processes)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distlib.cli import main
from distlib.cli.config import ask, default_config, write_config
from distlib.errors import ConfigError
from distlib.launcher.config import read_config_file, resolve, to_plan, validate

ACCELERATE_BASE = {"compute_environment": "LOCAL_MACHINE", "debug": False,
                   "machine_rank": 0, "main_training_function": "main", "num_machines": 1,
                   "rdzv_backend": "static", "same_network": True, "tpu_env": [],
                   "tpu_use_cluster": False, "tpu_use_sudo": False, "use_cpu": False,
                   "downcast_bf16": "no", "enable_cpu_affinity": False}


def _write(tmp_path: Path, data: dict, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_flag_beats_config_beats_environment_beats_default(tmp_path: Path) -> None:
    config = read_config_file(_write(tmp_path, {"precision": "fp16", "num_processes": 4,
                                                "max_restarts": 2}))
    environ = {"DISTLIB_PRECISION": "fp8", "DISTLIB_DEBUG": "1", "DISTLIB_TIMEOUT": "30"}
    got = resolve({"num_processes": 2}, config, environ)
    assert got["num_processes"] == (2, "flag")
    assert got["precision"] == ("fp16", "config file")
    assert got["max_restarts"] == (2, "config file")
    assert got["debug"] == (True, "environment (DISTLIB_DEBUG)")
    assert got["timeout"] == (30, "environment (DISTLIB_TIMEOUT)")
    assert got["rdzv_backend"] == ("static", "default")


def test_slurm_fills_the_machines_unless_a_flag_does() -> None:
    environ = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
               "SLURM_JOB_NODELIST": "gpu[07-08]"}
    got = resolve({"machine_rank": 0}, {"num_machines": "1"}, environ)
    assert got["num_machines"] == ("2", "environment (SLURM_NNODES)")
    assert got["main_address"][0] == "gpu07" and got["main_port"][0] == 15000 + 4242
    assert got["machine_rank"] == (0, "flag")
    plan = to_plan(resolve({"num_processes": 8}, {}, environ))
    assert (plan.max_machines, plan.nproc_per_node, plan.machine_rank) == (2, 4, 1)


ACCELERATE_CASES = [
    ({"distributed_type": "NO", "mixed_precision": "no", "num_processes": 1},
     {"nproc_per_node": 1, "strategy": None, "precision": "no"}),
    ({"distributed_type": "MULTI_CPU", "mixed_precision": "bf16", "num_processes": 2,
      "use_cpu": True}, {"nproc_per_node": 2, "strategy": "ddp", "cpu": True,
                         "precision": "bf16"}),
    ({"distributed_type": "MULTI_GPU", "mixed_precision": "fp16", "num_processes": 2,
      "gpu_ids": "0,1", "main_process_port": 29555},
     {"strategy": "ddp", "gpu_ids": "0,1", "main_port": 29555, "precision": "fp16"}),
    ({"distributed_type": "FSDP", "mixed_precision": "bf16", "num_processes": 2,
      "fsdp_config": {"fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                      "fsdp_backward_prefetch": "BACKWARD_PRE", "fsdp_forward_prefetch": False,
                      "fsdp_cpu_ram_efficient_loading": False, "fsdp_offload_params": True,
                      "fsdp_sharding_strategy": "SHARD_GRAD_OP",
                      "fsdp_state_dict_type": "FULL_STATE_DICT",
                      "fsdp_sync_module_states": True,
                      "fsdp_transformer_layer_cls_to_wrap": "GPT2Block",
                      "fsdp_use_orig_params": True, "fsdp_version": 1,
                      "fsdp_activation_checkpointing": True}},
     {"strategy": "fsdp", "strategy_options": {"cpu_offload": True, "hybrid_shard": False,
                                               "sync_module_states": True,
                                               "reshard_after_forward": False,
                                               "state_dict_type": "full",
                                               "wrap_classes": "GPT2Block",
                                               "activation_checkpointing": True}}),
    ({"distributed_type": "FSDP", "num_processes": 2, "mixed_precision": "no",
      "fsdp_config": {"fsdp_version": 2, "fsdp_reshard_after_forward": True,
                      "fsdp_auto_wrap_policy": "SIZE_BASED_WRAP",
                      "fsdp_min_num_params": 1000}},
     {"strategy_options": {"reshard_after_forward": True, "min_num_params": 1000}}),
    ({"distributed_type": "DEEPSPEED", "mixed_precision": "bf16", "num_processes": 2,
      "deepspeed_config": {"gradient_accumulation_steps": 4, "gradient_clipping": 1.0,
                           "offload_optimizer_device": "cpu", "offload_param_device": "none",
                           "zero3_init_flag": False, "zero_stage": 3,
                           "deepspeed_multinode_launcher": "standard"}},
     {"strategy": "deepspeed", "strategy_options": {
         "gradient_accumulation_steps": 4, "gradient_clipping": 1.0,
         "offload_optimizer": "cpu", "offload_param": "none", "zero_stage": 3}}),
    ({"distributed_type": "MULTI_GPU", "num_processes": -1, "mixed_precision": "no",
      "dynamo_config": {"dynamo_backend": "NO"}}, {"nproc_per_node": None}),
]


@pytest.mark.parametrize(("accelerate", "expected"), ACCELERATE_CASES)
def test_accelerate_configs_are_read_as_is(tmp_path: Path, accelerate: dict,
                                           expected: dict) -> None:
    path = _write(tmp_path, ACCELERATE_BASE | accelerate)
    plan = to_plan(resolve({}, read_config_file(path), {}))
    for field, value in expected.items():
        assert getattr(plan, field) == value, field


@pytest.mark.parametrize(("data", "words"), [
    ({"num_procesess": 2}, ["num_procesess", "num_processes"]),
    ({"num_processes": "two"}, ["num_processes", "'two'", "whole number"]),
    ({"precision": "fp32"}, ["precision", "'fp32'", "'bf16'"]),
    ({"strategy": "zero"}, ["strategy", "'zero'", "'deepspeed'"]),
    ({"cpu": "maybe"}, ["cpu", "'maybe'", "true or false"]),
    (ACCELERATE_BASE | {"distributed_type": "MULTI_NPU"}, ["distributed_type", "MULTI_NPU",
                                                           "MULTI_GPU"]),
    (ACCELERATE_BASE | {"compute_environment": "AMAZON_SAGEMAKER"}, ["compute_environment"]),
    (ACCELERATE_BASE | {"distributed_type": "FSDP", "fsdp_config": {"fsdp_wrap": 1}},
     ["fsdp_config", "fsdp_wrap"]),
    (ACCELERATE_BASE | {"mixed_precison": "bf16"}, ["mixed_precison", "mixed_precision"]),
    (ACCELERATE_BASE | {"distributed_type": "FSDP",
                        "fsdp_config": {"fsdp_sharding_strategy": "HALF"}}, ["HALF"]),
    ([1, 2], ["top level"]),
])
def test_bad_config_files_name_key_value_and_choices(tmp_path: Path, data, words) -> None:
    with pytest.raises(ConfigError) as info:
        read_config_file(_write(tmp_path, data))
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(("values", "words"), [
    ({"cpu": True, "strategy": "xla"}, ["strategy", "'xla'", "cpu"]),
    ({"cpu": True, "gpu_ids": "0,1"}, ["gpu_ids", "'0,1'", "--cpu"]),
    ({"strategy": "ddp", "zero_stage": 3}, ["--zero-stage 3", "--strategy deepspeed", "'ddp'"]),
    ({"num_processes": 3, "num_machines": "2"}, ["multiple", "3"]),
])
def test_impossible_combinations(values: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        to_plan(resolve(validate(values, "flags"), {}, {}))
    for word in words:
        assert word in str(info.value)


def test_cpu_allows_deepspeed_and_fp16() -> None:
    plan = to_plan(resolve(validate({"cpu": True, "strategy": "deepspeed", "zero_stage": 3,
                                     "precision": "fp16"}, "flags"), {}, {}))
    assert (plan.strategy, plan.precision, plan.strategy_options) == (
        "deepspeed", "fp16", {"zero_stage": 3})


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="readable"):
        read_config_file(str(tmp_path / "none.yaml"))
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="YAML"):
        read_config_file(str(tmp_path / "bad.yaml"))


def test_questionnaire_reads_piped_answers_and_writes_a_valid_file(tmp_path: Path) -> None:
    answers = "no\n2\n1\n10.1.2.3\n\nc10d\n4\n0\ndeepspeed\n3\ncpu\n\nbf16\n"
    out = io.StringIO()
    values = ask(io.StringIO(answers), out, num_gpus=1)
    assert values == {"cpu": False, "num_machines": 2, "machine_rank": 1,
                      "main_address": "10.1.2.3", "main_port": 29500, "rdzv_backend": "c10d",
                      "num_processes": 4, "gpu_ids": "0", "strategy": "deepspeed",
                      "zero_stage": 3, "offload_optimizer_device": "cpu",
                      "offload_param_device": "none", "precision": "bf16"}
    assert "ZeRO stage" in out.getvalue()
    path = str(tmp_path / "q.yaml")
    write_config(path, values, force=False)
    plan = to_plan(resolve({}, read_config_file(path), {}))
    assert plan.strategy_options["zero_stage"] == 3 and plan.machine_rank == 1


def test_questionnaire_asks_again_then_fails_on_bad_answers() -> None:
    out = io.StringIO()
    values = ask(io.StringIO("perhaps\nyes\n\n\n\nno\n"), out, num_gpus=0)
    assert values["cpu"] is True and "true or false" in out.getvalue()
    with pytest.raises(ConfigError):
        ask(io.StringIO("x\nmaybe\nz\n"), io.StringIO(), num_gpus=0)


def test_config_default_refuses_to_overwrite_without_force(tmp_path: Path, capsys) -> None:
    path = str(tmp_path / "d" / "default_config.yaml")
    assert main(["config", "default", "--config-file", path]) == 0
    assert yaml.safe_load(Path(path).read_text()) == default_config(0)
    assert path in capsys.readouterr().out
    assert main(["config", "default", "--config_file", path]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["config", "default", "--config-file", path, "--force"]) == 0


def test_dry_run_prints_each_value_with_its_source(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, ACCELERATE_BASE | {"distributed_type": "MULTI_CPU",
                                               "mixed_precision": "bf16", "num_processes": 4})
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    code = main(["launch", "--dry-run", "--config_file", path, "--num_processes", "2",
                 "--max-restarts=1", str(script), "--lr_rate", "3"])
    out = capsys.readouterr().out
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert rows["num_processes"].split()[1:] == ["2", "flag"]
    assert "bf16" in rows["precision"] and f"config file {path}" in rows["precision"]
    assert rows["max_restarts"].split()[1:] == ["1", "flag"]
    assert rows["monitor_interval"].split()[1:] == ["0.1", "default"]
    assert rows["rdzv_backend"].split()[1:3] == ["static", "config"]
    assert out.rstrip().endswith(f"script {script} --lr_rate 3")


def test_cli_errors_are_one_clear_line(tmp_path: Path, capsys) -> None:
    assert main(["launch", "--num-processes", "3", "--num-machines", "2", "--main-port",
                 "1234", "--dry-run", "x.py"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distlib launch: error:") and "multiple" in err
    assert main(["launch", "--cpu", "no_such_script.py"]) == 2
    assert "no_such_script.py" in capsys.readouterr().err


def test_help_is_torch_free_and_lists_the_commands() -> None:
    code = ("import sys\nfrom distlib.cli import main\n"
            "for argv in (['--help'], ['launch', '--help'], ['test', '--help'],"
            " ['config', '--help']):\n"
            "    try: main(argv)\n    except SystemExit: pass\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip().endswith("TORCH False")
    for word in ("launch", "config", "test", "--num-processes", "--fsdp-cpu-offload",
                 "--zero-stage", "--check", "--dry-run", "--no-python"):
        assert word in out
    for hidden in ("--num_processes", "--fsdp_cpu_offload", "--no_cpu", "--dry_run"):
        assert hidden not in out  # accepted (see below), but not listed


def test_underscore_spellings_and_negative_switches_are_accepted() -> None:
    import argparse

    from distlib.cli import launch as launch_command

    parser = argparse.ArgumentParser()
    launch_command.add_arguments(parser)
    args = parser.parse_args(["--num_processes", "2", "--no_cpu", "--fsdp_cpu_offload",
                              "--no-debug", "--dry_run", "--num-cpu-threads-per-process", "3",
                              "x.py"])
    assert (args.num_processes, args.cpu, args.fsdp_cpu_offload, args.debug) == (2, False,
                                                                                 True, False)
    assert (args.dry_run, args.num_threads, args.strategy) == (True, 3, None)


BOOL_WORDS = [(word, True) for word in ("1", "true", "yes", "on", "TRUE", "Yes", " On ")] + [
    (word, False) for word in ("0", "false", "no", "off", "FALSE", "No", " OFF ")]


def test_the_boolean_vocabulary_is_the_documented_one() -> None:
    from distlib.env import FALSE_WORDS, TRUE_WORDS

    assert TRUE_WORDS == ("1", "true", "yes", "on")
    assert FALSE_WORDS == ("0", "false", "no", "off")
    assert {word.strip().lower() for word, _ in BOOL_WORDS} == set(TRUE_WORDS + FALSE_WORDS)


@pytest.mark.parametrize("word, value", BOOL_WORDS)
def test_one_boolean_parser_for_detect_launch_and_config_files(
        word: str, value: bool, tmp_path: Path, capsys, monkeypatch) -> None:
    from distlib.env import Hardware, detect
    from distlib.launcher.config import read_config_data

    assert (detect({"DISTLIB_CPU": word}, hardware=Hardware(num_gpus=1)).device == "cpu") is value
    monkeypatch.delenv("DISTLIB_CONFIG_FILE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no default config file
    monkeypatch.setenv("DISTLIB_CPU", word)
    script = tmp_path / "train.py"
    script.write_text("")
    assert main(["launch", "--dry-run", str(script)]) == 0, capsys.readouterr().err
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.strip()}
    assert rows["cpu"] == [str(value), "environment", "(DISTLIB_CPU)"]
    assert read_config_file(_write(tmp_path, {"cpu": word, "debug": word})) == {
        "cpu": value, "debug": value}
    accelerate = read_config_data(ACCELERATE_BASE | {"distributed_type": "NO", "use_cpu": word})
    assert accelerate.settings["cpu"] is value
    answers = ask(io.StringIO(f"{word}\n\n\n\n\n"), io.StringIO(), num_gpus=1)
    assert answers["cpu"] is value


def _sample(setting) -> object:
    """A valid value of ``setting`` that is not its default."""
    given = {"num_machines": "2", "main_address": "10.0.0.7", "gpu_ids": "0,1",
             "fsdp_wrap_classes": "Linear", "deepspeed_config_file": "ds.json",
             "offload_optimizer_nvme_path": "/nvme/o", "offload_param_nvme_path": "/nvme/p",
             "main_port": 29400, "machine_rank": 1, "rdzv_id": "job7",
             "log_dir": "logs", "ranks_filter": "1"}
    if setting.name in given:
        return given[setting.name]
    if setting.mesh_axis is not None:
        return 2  # fits the 2 processes `distlib config` offers on a 2-GPU machine
    if setting.choices:
        return setting.choices[1]
    return {bool: True, int: 3, float: 0.5}[setting.kind]


def _context(setting) -> dict[str, object]:
    """The other settings a sample needs to make a valid plan."""
    if setting.name.endswith("_nvme_path"):  # a folder for NVMe offload needs NVMe offload
        device = setting.name.removesuffix("_nvme_path") + "_device"
        return {"strategy": "deepspeed", device: "nvme"}
    if setting.group == "mesh":  # asked with FSDP, which shards over the mesh's data axes
        return {"strategy": "fsdp"}
    if setting.group != "launch":
        return {"strategy": setting.group}
    if setting.name in ("tee", "redirects"):  # the streams they name go to the log files
        return {"log_dir": "logs"}
    return {"num_machines": "2"} if setting.name == "machine_rank" else {}


def _plan_value(plan, setting) -> object:
    if setting.strategy_option is not None:
        return plan.strategy_options[setting.strategy_option[1]]
    if setting.mesh_axis is not None:
        return getattr(plan.mesh, setting.mesh_axis)
    if setting.name == "num_processes":
        return plan.nproc_per_node * plan.max_machines
    if setting.name == "num_machines":
        return str(plan.max_machines)
    if setting.name == "ranks_filter":  # "1" is read into the ranks (1,)
        return ",".join(map(str, plan.ranks_filter))
    return getattr(plan, setting.plan_field)


def _argv(values: dict[str, object], flag_of) -> list[str]:
    argv: list[str] = []
    for name, value in values.items():
        flag = flag_of(SETTINGS[name])
        argv += [flag] if value is True else [flag, str(value)]
    return argv


from distlib.launcher.settings import SETTINGS, TABLE  # noqa: E402
from distlib.topology import parse_mesh  # noqa: E402


@pytest.mark.parametrize("setting", TABLE, ids=[s.name for s in TABLE])
def test_each_setting_round_trips_from_flag_config_key_environment_and_question(
        setting, tmp_path: Path) -> None:
    import argparse

    from distlib.cli import launch as launch_command
    from distlib.cli.config import QUESTIONS
    from distlib.launcher._environ import child_environ

    value, context = _sample(setting), _context(setting)
    assert setting.plan_field is not None or setting.strategy_option is not None or (
        setting.name in ("num_processes", "num_machines"))
    # flag -> plan, in every spelling (--a-b, --a_b, and the aliases)
    spellings = [lambda s: s.flag, lambda s: s.flag.replace("-", "_").replace("__", "--")]
    spellings += [lambda s, a=alias: a if s is setting else s.flag for alias in setting.aliases]
    for flag_of in spellings:
        parser = argparse.ArgumentParser()
        launch_command.add_arguments(parser)
        args = parser.parse_args([*_argv(context | {setting.name: value}, flag_of), "x.py"])
        resolved, _ = launch_command.resolve_config(args, {"HOME": str(tmp_path)})
        assert resolved[setting.name] == (value, "flag")
        assert _plan_value(launch_command.to_plan(resolved), setting) == value
    # config key -> plan
    config = read_config_file(_write(tmp_path, context | {setting.name: value}))
    assert _plan_value(to_plan(resolve({}, config, {})), setting) == value
    # environment variable -> plan, and the plan -> the ranks' variable
    if setting.environ is not None:
        # the mesh's one variable holds every axis: DISTLIB_MESH="tp=2"
        raw = f"{setting.mesh_axis}={value}" if setting.mesh_axis else str(value)
        plan = to_plan(resolve({}, {}, {setting.environ: raw}))
        assert _plan_value(plan, setting) == value
        passed = child_environ({}, plan)[setting.environ]
        if setting.mesh_axis is not None:
            passed = str(getattr(parse_mesh(passed), setting.mesh_axis))
        assert passed in (str(value), "1")
    # question -> config file
    if setting.question is not None:
        assert setting in QUESTIONS
        wanted = context | {setting.name: value}
        if setting.ask_when == "several machines":
            wanted.setdefault("num_machines", "2")
        if setting.ask_when == "gpus":
            wanted["cpu"] = False

        class Answers(io.StringIO):
            """Answers each question by the setting it asks about (the rest: defaults)."""

            def readline(self, size: int = -1) -> str:
                asked = out.getvalue().rsplit("\n", 1)[-1]
                for s in QUESTIONS:
                    if asked.startswith(str(s.question)) and s.name in wanted:
                        answer = wanted[s.name]
                        return ("yes" if answer else "no") if isinstance(answer, bool) else (
                            f"{answer}\n")
                return "\n"

        out = io.StringIO()
        values = ask(Answers(), out, num_gpus=2)
        path = str(tmp_path / "asked.yaml")
        write_config(path, values, force=True)
        assert read_config_file(path)[setting.name] == value
        assert _plan_value(to_plan(resolve({}, read_config_file(path), {})), setting) == value
