"""The launcher knows the mesh: its four settings (flags, config keys, a ``mesh:`` block,
``DISTLIB_MESH``), Accelerate's ``parallelism_config`` read as is, the refusal of a mesh that
does not fit the processes before anything starts, and ``--dry-run``'s coordinates (no
processes are started here)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from distlib.cli import launch as launch_command
from distlib.cli import main
from distlib.errors import ConfigError
from distlib.launcher._agent import _mesh_refusal
from distlib.launcher._environ import child_environ
from distlib.launcher.config import read_config, read_config_data, resolve, to_plan
from distlib.launcher.plan import LaunchPlan, plan_launch
from distlib.launcher.settings import SETTINGS, TABLE
from distlib.topology import AXES, Mesh

DATA = Path(__file__).parent.parent / "data" / "accelerate"
MESH_SETTINGS = [s for s in TABLE if s.mesh_axis is not None]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    launch_command.add_arguments(parser)
    return parser.parse_args([*argv, "x.py"])


def _plan(argv: list[str], environ: dict[str, str] | None = None) -> LaunchPlan:
    resolved, _ = launch_command.resolve_config(_parse(argv), environ or {"HOME": "/nowhere"})
    return to_plan(resolved)


def test_the_table_has_one_setting_per_axis_sharing_one_variable() -> None:
    assert [s.mesh_axis for s in MESH_SETTINGS] == list(AXES)
    for setting in MESH_SETTINGS:
        assert setting.name == f"{setting.mesh_axis}_size"
        assert setting.flag == f"--{setting.mesh_axis.replace('_', '-')}-size"
        assert (setting.environ, setting.plan_field, setting.kind) == ("DISTLIB_MESH", "mesh", int)


@pytest.mark.parametrize("setting", MESH_SETTINGS, ids=[s.name for s in MESH_SETTINGS])
def test_each_axis_flag_in_both_spellings_fills_the_plans_mesh(setting: Any) -> None:
    # dp_shard given: the others are 1, so it must be the process count; else dp_shard is
    # inferred (the ranks the other axes leave)
    count = 2 if setting.mesh_axis == "dp_shard" else 8
    for flag in (setting.flag, "--" + setting.name):  # --tp-size and --tp_size
        plan = _plan(["--num-processes", str(count), flag, "2"])
        assert plan.mesh is not None and getattr(plan.mesh, setting.mesh_axis) == 2
        assert plan.mesh.world_size == count
        expected = dict.fromkeys(AXES, 1) | {setting.mesh_axis: 2}
        if setting.mesh_axis != "dp_shard":
            expected["dp_shard"] = 4
        assert plan.mesh == Mesh(**expected)


def test_no_mesh_setting_leaves_each_rank_its_default() -> None:
    plan = _plan(["--num-processes", "4"])
    assert plan.mesh is None
    assert "DISTLIB_MESH" not in child_environ({"DISTLIB_MESH": "tp=2"}, plan)  # not inherited


def test_the_ranks_receive_the_resolved_mesh() -> None:
    plan = _plan(["--num-processes", "8", "--dp-replicate-size", "2", "--tp-size", "2"])
    assert child_environ({}, plan)["DISTLIB_MESH"] == "dp_replicate=2,dp_shard=2,cp=1,tp=2"
    unknown = _plan(["--tp-size", "2"])  # the process count is left to the visible GPUs
    assert child_environ({}, unknown)["DISTLIB_MESH"] == "dp_replicate=1,dp_shard=-1,cp=1,tp=2"


def test_flag_beats_config_beats_environment_per_axis(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"num_processes": 8, "tp_size": 4, "cp_size": 2}))
    environ = {"HOME": str(tmp_path), "DISTLIB_MESH": "dp_replicate=2,cp=4,tp=8"}
    resolved, _ = launch_command.resolve_config(
        _parse(["--config-file", str(path), "--tp-size", "2"]), environ)
    assert resolved["tp_size"] == (2, "flag")
    assert resolved["cp_size"] == (2, f"config file {path}")
    assert resolved["dp_replicate_size"] == (2, "environment (DISTLIB_MESH)")
    assert resolved["dp_shard_size"] == (None, "default")
    assert to_plan(resolved).mesh == Mesh(dp_replicate=2, dp_shard=1, cp=2, tp=2)


@pytest.mark.parametrize("block", [{"dp_shard": 2, "tp": 2}, "dp_shard=2, tp=2"])
def test_a_mesh_block_in_distlibs_config_is_the_four_keys(block: Any) -> None:
    config = read_config_data({"num_processes": 4, "mesh": block})
    assert config.settings["dp_shard_size"] == 2 and config.settings["tp_size"] == 2
    assert to_plan(resolve({}, config.settings, {})).mesh == Mesh(dp_shard=2, tp=2)
    assert "tp_size=2" in config.notes[-1].effect and config.notes[-1].key == "mesh"
    flat = read_config_data({"num_processes": 4, "dp_shard_size": 2, "tp_size": 2})
    assert to_plan(resolve({}, flat.settings, {})).mesh == Mesh(dp_shard=2, tp=2)


@pytest.mark.parametrize(("data", "words"), [
    ({"mesh": {"tensor": 2}}, ["`mesh`", "'tensor'", "dp_replicate, dp_shard, cp, tp"]),
    ({"mesh": "tp:2"}, ["`mesh`", "'tp:2'", "AXIS=SIZE"]),
    ({"mesh": 2}, ["`mesh`", "2", "mapping of axis sizes"]),
    ({"mesh": {"tp": 2}, "tp_size": 2}, ["`mesh`", "tp_size", "once"]),
    ({"mesh": {"tp": 0}}, ["`tp_size` must be >= 1", "0"]),
    ({"tp_size": 0}, ["`tp_size` must be >= 1", "0"]),
    ({"cp_size": "two"}, ["`cp_size` must be a whole number", "'two'"]),
    ({"tp_sise": 2}, ["Did you mean `tp_size`?"]),
])
def test_bad_mesh_keys_name_the_key_the_rule_and_the_value(data: dict[str, Any],
                                                          words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        read_config_data(data, "config file c.yaml")
    assert str(info.value).startswith("config file c.yaml: "), info.value
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_flag_values_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"`tp_size` must be >= 1, but got 0"):
        _plan(["--tp-size", "0"])
    with pytest.raises(SystemExit):
        _parse(["--tp-size", "two"])
    with pytest.raises(ConfigError, match=r"DISTLIB_MESH must be AXIS=SIZE pairs.*'tp:2'"):
        _plan([], {"HOME": "/nowhere", "DISTLIB_MESH": "tp:2"})


@pytest.mark.parametrize(("argv", "words"), [
    (["--num-processes", "4", "--tp-size", "3"], ["3", "4 processes", "divide", "--tp-size"]),
    (["--num-processes", "8", "--dp-shard-size", "2", "--tp-size", "2"],
     ["dp_shard=2", "tp=2", "8 processes", "--num-processes"]),
    (["--num-processes", "4", "--num-machines", "2", "--main-port", "29400", "--tp-size", "4",
      "--dp-shard-size", "2"], ["product 8", "for 4 processes (2 per machine x 2 machines)"]),
])
def test_a_mesh_that_does_not_fit_the_processes_is_refused_before_anything_starts(
        argv: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        _plan(argv)
    assert "must multiply to the number of processes" in str(info.value)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_the_agent_checks_a_mesh_once_it_counts_the_ranks() -> None:
    assert _mesh_refusal(LaunchPlan(cpu=True, mesh="tp=2")) != ""  # 1 CPU rank: tp=2 won't fit
    assert "1 processes" in _mesh_refusal(LaunchPlan(cpu=True, mesh="tp=2"))
    assert _mesh_refusal(LaunchPlan(cpu=True, mesh="tp=1")) == ""
    assert _mesh_refusal(LaunchPlan(cpu=True)) == ""
    elastic = LaunchPlan(nproc_per_node=2, min_machines=1, max_machines=2, rdzv_backend="c10d",
                         main_port=29400, mesh="tp=2")
    assert _mesh_refusal(elastic) == ""  # the world size is known only in the ranks


def test_launch_takes_a_mesh_in_any_spelling() -> None:
    for mesh in ("tp=2", {"tp": 2}, Mesh(tp=2)):
        assert plan_launch(num_processes=4, mesh=mesh).mesh == Mesh(dp_shard=2, tp=2)
    with pytest.raises(ConfigError, match="mesh must be a Mesh"):
        LaunchPlan(mesh=4)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"mesh must map axes"):
        LaunchPlan(mesh={"tensor": 2})  # type: ignore[arg-type]


def test_a_plan_with_a_mesh_survives_the_trip_to_the_agent() -> None:
    import dataclasses
    import json

    plan = plan_launch(num_processes=8, mesh="dp_replicate=2,tp=2")
    again = LaunchPlan(**json.loads(json.dumps(dataclasses.asdict(plan))))
    assert again.mesh == plan.mesh == Mesh(dp_replicate=2, dp_shard=2, tp=2)


def test_xla_refuses_tensor_and_context_parallel_axes() -> None:
    with pytest.raises(ConfigError, match="strategy 'xla'"):
        LaunchPlan(nproc_per_node=4, strategy="xla", mesh="tp=2")
    assert LaunchPlan(nproc_per_node=4, strategy="xla", mesh="dp_shard=4").mesh is not None


# ---- Accelerate's parallelism_config, read as is ------------------------------------------

def test_accelerates_templates_are_the_mesh() -> None:
    tp_hsdp = to_plan(resolve({}, read_config(str(DATA / "tp_hsdp.yaml")).settings, {}))
    assert tp_hsdp.mesh == Mesh(dp_replicate=2, dp_shard=2, cp=1, tp=2)
    assert (tp_hsdp.strategy, tp_hsdp.nproc_per_node) == ("fsdp", 8)
    cp = to_plan(resolve({}, read_config(str(DATA / "cp.yaml")).settings, {}))
    assert cp.mesh == Mesh(dp_replicate=1, dp_shard=1, cp=8, tp=1)
    assert cp.strategy == "fsdp"


def _accelerate(section: dict[str, Any], num_processes: int = 4) -> Any:
    return read_config_data({"distributed_type": "FSDP", "num_processes": num_processes,
                             "parallelism_config": section})


def test_an_absent_size_is_one_as_in_accelerate() -> None:
    config = _accelerate({"parallelism_config_tp_size": 2, "parallelism_config_dp_shard_size": 2})
    assert {k: config.settings[k] for k in ("dp_replicate_size", "dp_shard_size", "cp_size",
                                            "tp_size")} == {"dp_replicate_size": 1,
                                                            "dp_shard_size": 2, "cp_size": 1,
                                                            "tp_size": 2}
    effects = {n.key: n.effect for n in config.notes}
    assert "Accelerate's default 1" in effects["parallelism_config.parallelism_config_tp_size"]
    # tp 2 alone on 4 processes: Accelerate refuses the product (2 != 4), and so does distlib
    alone = _accelerate({"parallelism_config_tp_size": 2})
    with pytest.raises(ConfigError, match="must multiply to the number of processes"):
        to_plan(resolve({}, alone.settings, {}))


def test_every_size_one_is_accelerates_pure_data_parallelism() -> None:
    config = _accelerate({f"parallelism_config_{a}_size": 1 for a in AXES})
    assert not any(k.endswith("_size") for k in config.settings)
    assert all(n.outcome == "no-op" for n in config.notes if n.key.startswith("parallelism"))
    assert to_plan(resolve({}, config.settings, {})).mesh is None


@pytest.mark.parametrize(("key", "value"), [
    ("parallelism_config_cp_comm_strategy", "allgather"),
    ("parallelism_config_cp_backend", "torch"),
    ("parallelism_config_sp_size", 1),
    ("parallelism_config_sp_backend", "deepspeed"),
    ("parallelism_config_sp_seq_length", 4096),
    ("parallelism_config_sp_seq_length_is_variable", True),
    ("parallelism_config_sp_attn_implementation", "sdpa"),
])
def test_accelerates_defaults_of_the_other_keys_are_no_ops(key: str, value: Any) -> None:
    config = _accelerate({"parallelism_config_cp_size": 2, "parallelism_config_dp_shard_size": 2,
                          key: value})
    note = next(n for n in config.notes if n.key == f"parallelism_config.{key}")
    assert note.outcome == "no-op" and "no-op (" in note.effect
    assert to_plan(resolve({}, config.settings, {})).mesh == Mesh(dp_shard=2, cp=2)


@pytest.mark.parametrize(("key", "value", "words"), [
    ("parallelism_config_cp_comm_strategy", "alltoall", ["'allgather'", "'alltoall'"]),
    ("parallelism_config_cp_backend", "deepspeed", ["'torch'", "'deepspeed'"]),
    ("parallelism_config_sp_size", 2, ["be 1", "Ulysses"]),
    ("parallelism_config_pp_size", 2, ["Accelerate's config format knows", "pp_size"]),
])
def test_keys_distlib_cannot_honour_stay_refused_by_name(key: str, value: Any,
                                                         words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        _accelerate({"parallelism_config_cp_size": 2, "parallelism_config_dp_shard_size": 2,
                     key: value})
    text = str(info.value)
    assert f"`parallelism_config.{key}` must " in text and ", but got " in text
    for word in words:
        assert word in text, (word, text)


# ---- --dry-run: the mesh and each rank's coordinates ---------------------------------------

def _dry_run(argv: list[str], tmp_path: Path, capsys: Any) -> list[str]:
    script = tmp_path / "train.py"
    script.write_text("")
    assert main(["launch", "--dry-run", *argv, str(script)]) == 0, capsys.readouterr().err
    return capsys.readouterr().out.splitlines()


def _coordinates(lines: list[str]) -> dict[int, tuple[int, ...]]:
    start = next(i for i, line in enumerate(lines) if line.startswith("rank  dp_replicate"))
    rows: dict[int, tuple[int, ...]] = {}
    for line in lines[start + 1:]:
        cells = line.split()
        if not cells or not cells[0].isdigit():
            break
        rows[int(cells[0])] = tuple(int(c) for c in cells[1:6])  # 4 axes + data-parallel rank
    return rows


def test_dry_run_of_accelerates_tp_hsdp_template(tmp_path: Path, capsys: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTLIB_MESH", raising=False)
    lines = _dry_run(["--config-file", str(DATA / "tp_hsdp.yaml")], tmp_path, capsys)
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.strip()}
    assert rows["strategy"][0] == "fsdp"
    for axis, size in (("dp_replicate", 2), ("dp_shard", 2), ("cp", 1), ("tp", 2)):
        assert rows[f"{axis}_size"][:2] == [str(size), "config"]
    head = next(line for line in lines if line.startswith("mesh: "))
    assert "dp_replicate=2 x dp_shard=2 x tp=2" in head
    assert "DISTLIB_MESH=dp_replicate=2,dp_shard=2,cp=1,tp=2" in head
    assert "strategy fsdp: tensor parallel over tp=2, then fully_shard over dp_replicate=2 x " \
           "dp_shard=2 (HSDP)" in head  # FSDP with the mesh, not a silent plain FSDP
    mesh = Mesh(dp_replicate=2, dp_shard=2, tp=2).resolve(8)
    assert _coordinates(lines) == {r: (*mesh.coordinates(r).values(), mesh.dp_rank(r))
                                   for r in range(8)}
    assert _coordinates(lines)[5] == (1, 0, 0, 1, 2)
    assert "ranks that share a batch: 0 1 | 2 3 | 4 5 | 6 7" in lines


def test_dry_run_of_accelerates_cp_template(tmp_path: Path, capsys: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTLIB_MESH", raising=False)
    lines = _dry_run(["--config-file", str(DATA / "cp.yaml")], tmp_path, capsys)
    head = next(line for line in lines if line.startswith("mesh: "))
    assert head.startswith("mesh: cp=8 (DISTLIB_MESH=dp_replicate=1,dp_shard=1,cp=8,tp=1)")
    assert "strategy fsdp: context parallel over cp=8, then fully_shard over dp_replicate=1 x " \
           "dp_shard=1" in head
    assert _coordinates(lines) == {r: (0, 0, r, 0, 0) for r in range(8)}
    assert "ranks that share a batch: 0 1 2 3 4 5 6 7" in lines


def test_dry_run_flags_and_defaults(tmp_path: Path, capsys: Any,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTLIB_MESH", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no default config file
    monkeypatch.delenv("DISTLIB_CONFIG_FILE", raising=False)
    lines = _dry_run(["--cpu", "--num-processes", "4", "--tp-size", "2"], tmp_path, capsys)
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.strip()}
    assert rows["tp_size"][:2] == ["2", "flag"]
    assert rows["dp_shard_size"][:2] == ["2", "derived"]
    assert rows["dp_replicate_size"][:2] == ["1", "default"]
    assert _coordinates(lines) == {0: (0, 0, 0, 0, 0), 1: (0, 0, 0, 1, 0), 2: (0, 1, 0, 0, 1),
                                   3: (0, 1, 0, 1, 1)}
    assert "ranks that share a batch: 0 1 | 2 3" in lines
    plain = _dry_run(["--cpu", "--num-processes", "2"], tmp_path, capsys)
    assert any(line.startswith("mesh: not set: all data parallel") for line in plain)
    assert {line.split()[0]: line for line in plain if line.strip()}["tp_size"].split()[1:4] == [
        "(not", "set:", "all"]


def test_dry_run_refuses_a_mesh_that_does_not_fit(tmp_path: Path, capsys: Any) -> None:
    script = tmp_path / "train.py"
    script.write_text("")
    assert main(["launch", "--dry-run", "--num-processes", "4", "--tp-size", "3",
                 str(script)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distlib launch: error:") and "must multiply" in err


def test_mesh_help_is_listed_once_per_axis() -> None:
    parser = argparse.ArgumentParser(formatter_class=__import__(
        "distlib.cli._args", fromlist=["Formatter"]).Formatter)
    launch_command.add_arguments(parser)
    text = parser.format_help()
    for axis in AXES:
        assert SETTINGS[f"{axis}_size"].flag in text
        assert f"--{axis}_size" not in text


def test_distlib_config_asks_the_mesh_under_fsdp_and_writes_only_sizes_above_one() -> None:
    import io

    from distlib.cli.config import QUESTIONS, ask

    asked = [s.name for s in QUESTIONS if s.mesh_axis is not None]
    assert asked == ["dp_replicate_size", "cp_size", "tp_size"]  # dp_shard: the rest
    assert all(SETTINGS[name].ask_when == "fsdp" for name in asked)
    out = io.StringIO()
    # cpu? machines? processes? strategy? then the FSDP questions, the mesh, precision
    answers = ask(io.StringIO("yes\n\n4\nfsdp\n\n\n\n\n\n\n\n2\n\n"), out, num_gpus=0)
    assert "FSDP: tensor-parallel size (tp)?" in out.getvalue()
    assert answers["tp_size"] == 2 and "cp_size" not in answers
    assert "dp_replicate_size" not in answers  # 1, the default: not written
    assert to_plan(resolve({}, answers, {})).mesh == Mesh(dp_shard=2, tp=2)
    plain = ask(io.StringIO("yes\n\n2\nddp\n\n"), io.StringIO(), num_gpus=0)
    assert not any(k.endswith("_size") for k in plain)
