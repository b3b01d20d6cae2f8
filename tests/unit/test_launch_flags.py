"""``distlib launch`` flags: Accelerate's and torchrun's spellings, flags over the config file,
options of a strategy not in use, config errors that name their file, Accelerate's default
config file, and "did you mean" for a misspelled flag (no ranks are started)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distlib.cli import launch, main
from distlib.cli._args import Formatter, Parser
from distlib.errors import ConfigError
from distlib.launcher.config import accelerate_config_path, resolve_sources, to_plan
from distlib.launcher.settings import SETTINGS, TABLE

ROOT = Path(__file__).resolve().parents[2]
FSDP_ACCELERATE = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP",
                   "num_processes": 1, "use_cpu": True, "mixed_precision": "no",
                   "fsdp_config": {"fsdp_sharding_strategy": "FULL_SHARD",
                                   "fsdp_offload_params": False}}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user with no config file anywhere, in a folder holding x.py."""
    for name in ("DISTLIB_CONFIG_FILE", "XDG_CACHE_HOME", "HF_HOME", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.py").write_text("print('hi')\n")
    return tmp_path


def _parse(argv: list[str]):
    parser = Parser(prog="distlib launch", formatter_class=Formatter)
    launch.add_arguments(parser)
    return parser.parse_args([*argv, "x.py"])


def _resolve(argv: list[str], home: Path) -> dict:
    resolved, _ = launch.resolve_config(_parse(argv), {"HOME": str(home)})
    return resolved


def _write(path: Path, data: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _cli(args: list[str], cwd: Path, **environ: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISTLIB_CONFIG_FILE", "XDG_CACHE_HOME", "HF_HOME", "SLURM_JOB_ID")}
    env |= {"HOME": str(cwd), "PYTHONPATH": str(ROOT)} | environ
    return subprocess.run([sys.executable, "-m", "distlib", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


# ---- Accelerate's and torchrun's spellings ------------------------------------------------

ALIASES = [
    ("--mixed_precision bf16", {"precision": "bf16"}),
    ("--mixed-precision=fp16", {"precision": "fp16"}),
    ("--main_process_ip 10.0.0.9", {"main_address": "10.0.0.9"}),
    ("--master-addr 10.0.0.9", {"main_address": "10.0.0.9"}),
    ("--master_addr=10.0.0.9", {"main_address": "10.0.0.9"}),
    ("--main_process_port 29501", {"main_port": 29501}),
    ("--master-port 29502", {"main_port": 29502}),
    ("--master_port=29503", {"main_port": 29503}),
    ("--nnodes 2", {"num_machines": "2"}),
    ("--nnodes=1:4", {"num_machines": "1:4"}),
    ("--node-rank 1", {"machine_rank": 1}),
    ("--node_rank=1", {"machine_rank": 1}),
    ("--num_cpu_threads_per_process 3", {"num_threads": 3}),
    ("--num-cpu-threads-per-process=3", {"num_threads": 3}),
    ("--nproc-per-node=4", {"nproc_per_node": 4}),
    ("--nproc_per_node=4", {"nproc_per_node": 4}),
    ("--nproc-per-node 4", {"nproc_per_node": 4}),
    ("--nproc_per_node 4", {"nproc_per_node": 4}),
    ("--num_processes 4", {"num_processes": 4}),
    ("--num_machines 2 --machine_rank 1", {"num_machines": "2", "machine_rank": 1}),
    ("--multi_gpu", {"strategy": "ddp"}),
    ("--multi-gpu", {"strategy": "ddp"}),
    ("--use_fsdp", {"strategy": "fsdp"}),
    ("--use-fsdp --strategy fsdp", {"strategy": "fsdp"}),
    ("--use_deepspeed", {"strategy": "deepspeed"}),
    ("--rdzv-id job7", {"rdzv_id": "job7"}),
    ("--rdzv_id=job7", {"rdzv_id": "job7"}),
    ("--rdzv-endpoint 10.0.0.9:29501", {"main_address": "10.0.0.9", "main_port": 29501}),
    ("--standalone", {"num_machines": "1", "machine_rank": 0, "main_address": "127.0.0.1",
                      "main_port": 0}),
    ("--standalone --nnodes 1 --nproc-per-node 2", {"num_machines": "1",
                                                    "nproc_per_node": 2}),
]


@pytest.mark.parametrize(("typed", "wanted"), ALIASES, ids=[a for a, _ in ALIASES])
def test_accelerate_and_torchrun_spellings_set_the_distlib_setting(
        typed: str, wanted: dict, home: Path) -> None:
    resolved = _resolve(shlex.split(typed), home)
    for name, value in wanted.items():
        got, source = resolved[name]
        assert got == value, name
        assert source.startswith("flag"), source


def test_a_shortcut_says_which_flag_set_the_setting(home: Path) -> None:
    resolved = _resolve(["--use_fsdp", "--standalone"], home)
    assert resolved["strategy"] == ("fsdp", "flag (--use_fsdp)")
    assert resolved["main_port"] == (0, "flag (--standalone)")


def test_rdzv_id_reaches_torchs_rendezvous(home: Path) -> None:
    from distlib.launcher._agent import _launch_config

    plan = to_plan(_resolve(["--rdzv-id", "job7", "--rdzv-backend", "c10d", "--cpu"], home))
    assert plan.run_id == "job7"
    assert _launch_config(plan, str(home), "spawn").run_id == "job7"
    assert to_plan(_resolve([], home)).run_id == "distlib"  # the default, as before


REFUSED = [
    ("--rdzv-conf timeout=5", ["--rdzv-conf must be left out", "timeout=5", "--timeout"]),
    ("--rdzv_conf=join_timeout=9", ["--rdzv_conf", "--timeout"]),
    ("--nproc-per-node gpu", ["--nproc-per-node", "'gpu'", "torchrun's word", "visible GPU"]),
    ("--nproc-per-node=auto", ["'auto'", "Leave it out"]),
    ("--nproc-per-node=cpu", ["'cpu'"]),
    ("--num-processes two", ["--num-processes", "whole number", "'two'"]),
    ("--use_fsdp --strategy ddp", ["--use_fsdp means --strategy fsdp", "--strategy ddp"]),
    ("--strategy deepspeed --multi_gpu", ["--multi_gpu means --strategy ddp", "deepspeed"]),
    ("--use_fsdp --use_deepspeed", ["--use_deepspeed means --strategy deepspeed, but "
                                    "--use_fsdp (--strategy fsdp) was given too"]),
    ("--standalone --nnodes 2", ["--standalone means --num-machines 1", "2"]),
    ("--standalone --master-port 29500", ["--standalone means --main-port 0", "29500"]),
    ("--standalone --node-rank 1", ["--standalone means --machine-rank 0", "1"]),
    ("--rdzv-endpoint nohost", ["--rdzv-endpoint must be HOST:PORT", "'nohost'"]),
    ("--rdzv-endpoint h:x", ["HOST:PORT", "'h:x'"]),
    ("--master-port 1 --rdzv-endpoint h:2", ["--rdzv-endpoint means --main-port 2",
                                            "--main-port 1"]),
    ("--strategy ddp --fsdp-cpu-offload", ["--fsdp-cpu-offload must only be given with "
                                           "--strategy fsdp", "'ddp'"]),
    ("--strategy ddp --no-fsdp-cpu-offload", ["--no-fsdp-cpu-offload must only be given"]),
    ("--strategy fsdp --zero-stage 3", ["--zero-stage 3", "--strategy deepspeed"]),
    ("--cpu --fsdp-cpu-offload", ["--fsdp-cpu-offload", "left to each rank"]),
]


@pytest.mark.parametrize(("typed", "words"), REFUSED, ids=[a for a, _ in REFUSED])
def test_a_flag_distlib_cannot_honour_is_refused_with_the_distlib_name(
        typed: str, words: list[str], home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["launch", "--dry-run", *shlex.split(typed), "x.py"])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("error:") == 1, err
    for word in words:
        assert word in err, (word, err)


# ---- flags beat the config file -----------------------------------------------------------

def test_a_flagged_count_overrides_the_config_files_other_count(home: Path) -> None:
    for config, argv, per_node in (
            ({"num_processes": 1}, ["--nproc-per-node", "2"], 2),
            ({"nproc_per_node": 1}, ["--num-processes", "2"], 2),
            (FSDP_ACCELERATE, ["--nproc_per_node=2"], 2),
            ({"num_processes": 4, "num_machines": 2, "main_port": 29500},
             ["--nproc-per-node", "3"], 3),
            ({"num_processes": 1, "nproc_per_node": 1}, ["--num-processes", "2"], 2)):
        path = _write(home / "c.yaml", config)
        resolved = _resolve(["--config-file", path, *argv], home)
        assert to_plan(resolved).nproc_per_node == per_node, config
        other = "num_processes" if "nproc" in argv[0] else "nproc_per_node"
        value, source = resolved[other]
        assert value is None and f"config file {path} said" in source, source
        assert "overridden by --" in source


def test_two_flagged_counts_that_disagree_are_still_an_error(home: Path) -> None:
    with pytest.raises(ConfigError, match="Give only one of the two counts"):
        to_plan(_resolve(["--num-processes", "2", "--nproc-per-node", "3"], home))


def test_dry_run_shows_the_overridden_count_and_the_ignored_options(home: Path) -> None:
    path = _write(home / "fsdp.yaml", FSDP_ACCELERATE)
    done = _cli(["launch", "--config-file", path, "--strategy", "ddp", "--nproc-per-node",
                 "2", "--dry-run", "x.py"], home)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    assert re.search(rf"^num_processes +2 +config file {re.escape(path)} said 1; overridden "
                     r"by --nproc-per-node$", rows["num_processes"]), rows["num_processes"]
    assert rows["strategy"].split()[1:] == ["ddp", "flag"]
    for name in ("fsdp_reshard_after_forward", "fsdp_cpu_offload", "fsdp_hybrid_shard"):
        assert rows[name].endswith(f"config file {path} (ignored: strategy is ddp)"), rows[name]
    assert f"from config file {path} ignored (strategy is ddp)" in done.stderr


def test_a_config_files_options_of_another_strategy_are_ignored(home: Path) -> None:
    for config, argv, strategy in (
            (FSDP_ACCELERATE, ["--strategy", "ddp"], "ddp"),
            ({"strategy": "fsdp", "fsdp_cpu_offload": True, "fsdp_wrap_classes": "Block"},
             ["--strategy", "ddp"], "ddp"),
            ({"strategy": "deepspeed", "zero_stage": 3}, ["--strategy", "fsdp"], "fsdp"),
            ({"strategy": "fsdp", "fsdp_cpu_offload": True},
             ["--strategy", "deepspeed", "--zero-stage", "1"], "deepspeed")):
        path = _write(home / "c.yaml", config)
        plan = to_plan(_resolve(["--cpu", "--config-file", path, *argv], home))
        assert plan.strategy == strategy
        assert plan.strategy_options == ({"zero_stage": 1} if strategy == "deepspeed" else {})


def test_an_option_of_another_strategy_from_the_file_alone_names_the_file(home: Path) -> None:
    path = _write(home / "c.yaml", {"fsdp_cpu_offload": True})
    with pytest.raises(ConfigError) as info:
        to_plan(_resolve(["--config-file", path], home))
    assert f"config file {path}" in str(info.value) and "fsdp_cpu_offload" in str(info.value)


BAD_CONFIGS = [
    {"num_processes": 3, "num_machines": 2, "main_port": 29500},
    {"machine_rank": 2},
    {"cpu": True, "strategy": "xla"},
    {"cpu": True, "gpu_ids": "0"},
    {"tp_size": 3, "num_processes": 4},
    {"num_processes": 2, "nproc_per_node": 3},
    {"num_machines": "1:2"},
    {"num_machines": 2, "main_port": 0},
    {"main_port": 70000},
    {"num_procesess": 2},
    {"precision": "fp9"},
    {"strategy": "zero"},
    {"fsdp_cpu_offload": True},
    {"strategy": "ddp", "fsdp_cpu_offload": "maybe"},
    {"distributed_type": "MULTI_CPU", "num_processes": 3, "num_machines": 2,
     "main_process_port": 29500},
    {"distributed_type": "FSDP", "fsdp_config": {"fsdp_sharding_strategy": "NO_SHARD"}},
    {"mesh": {"tp": 3}, "num_processes": 4, "strategy": "fsdp"},
]


@pytest.mark.parametrize("config", BAD_CONFIGS, ids=[str(c) for c in BAD_CONFIGS])
def test_every_config_error_names_the_file(config: dict, home: Path) -> None:
    path = _write(home / "bad.yaml", config)
    with pytest.raises(ConfigError) as info:
        resolved, _ = resolve_sources({}, path, {"HOME": str(home)})
        to_plan(resolved)
    assert f"config file {path}" in str(info.value), str(info.value)


# ---- Accelerate's default config file -----------------------------------------------------

def test_accelerate_default_config_path_follows_accelerates_rule() -> None:
    assert accelerate_config_path({"HF_HOME": "/hf", "XDG_CACHE_HOME": "/x", "HOME": "/u"}) == (
        "/hf/accelerate/default_config.yaml")
    assert accelerate_config_path({"XDG_CACHE_HOME": "/x", "HOME": "/u"}) == (
        "/x/huggingface/accelerate/default_config.yaml")
    assert accelerate_config_path({"HOME": "/u"}) == (
        "/u/.cache/huggingface/accelerate/default_config.yaml")
    assert accelerate_config_path({"HF_HOME": "~/hf", "HOME": "/u"}) == (
        "/u/hf/accelerate/default_config.yaml")


@pytest.mark.parametrize("where", ["HOME", "XDG_CACHE_HOME", "HF_HOME"])
def test_accelerates_default_config_is_read_when_distlib_has_none(where: str,
                                                                  home: Path) -> None:
    folder = {"HOME": home / ".cache" / "huggingface", "XDG_CACHE_HOME": home / "xdg" /
              "huggingface", "HF_HOME": home / "hf"}[where]
    environ = {"XDG_CACHE_HOME": str(home / "xdg")} if where == "XDG_CACHE_HOME" else (
        {"HF_HOME": str(home / "hf")} if where == "HF_HOME" else {})
    path = _write(folder / "accelerate" / "default_config.yaml",
                  {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_CPU",
                   "num_processes": 2, "mixed_precision": "bf16", "use_cpu": True})
    done = _cli(["launch", "--dry-run", "x.py"], home, **environ)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("distlib: note: no distlib config file, so Accelerate's "
                                  f"default config file is read: {path}"), done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    assert rows["precision"].split() == ["precision", "bf16", "config", "file", path]
    assert rows["num_processes"].split()[1] == "2"
    assert (f"config file {path} (Accelerate format; Accelerate's default config file "
            "(distlib has none)), key by key:") in done.stdout
    # distlib's own file, when there is one, wins, and nothing is said about Accelerate's
    own = _write(Path(environ.get("XDG_CACHE_HOME", home / ".cache")) / "distlib" /
                 "default_config.yaml", {"precision": "fp16"})
    done = _cli(["launch", "--dry-run", "x.py"], home, **environ)
    assert done.returncode == 0 and "note" not in done.stderr, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    assert rows["precision"].split() == ["precision", "fp16", "config", "file", own]
    # so does --config-file
    other = _write(home / "mine.yaml", {"precision": "no"})
    done = _cli(["launch", "--config-file", other, "--dry-run", "x.py"], home, **environ)
    assert done.returncode == 0 and path not in done.stdout + done.stderr


# ---- "did you mean" -----------------------------------------------------------------------

TYPOS = [("--num-proceses 2", "--num-processes"), ("--num_proceses=2", "--num-processes"),
         ("--nproc-per-ndoe 2", "--nproc-per-node"), ("--stratgy ddp", "--strategy"),
         ("--master-adr h", "--master-addr"), ("--mixed_precison bf16", "--mixed-precision"),
         ("--dryrun", "--dry-run"), ("--fsdp-cpu-ofload", "--fsdp-cpu-offload")]


@pytest.mark.parametrize(("typed", "near"), TYPOS, ids=[t for t, _ in TYPOS])
def test_a_misspelled_flag_gets_did_you_mean(typed: str, near: str, home: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["launch", "--dry-run", *shlex.split(typed), "x.py"])
    err = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2
    assert err[-1] == (f"distlib launch: error: unknown option {typed.split()[0].split('=')[0]}."
                       f" Did you mean {near}?")
    assert sum("error" in line for line in err) == 1


def test_did_you_mean_as_a_user_meets_it(home: Path) -> None:
    for command in ("launch", "test"):
        done = _cli([command, "--num-proceses", "2", "x.py"], home)
        assert done.returncode == 2
        assert done.stderr.splitlines()[-1] == (
            f"distlib {command}: error: unknown option --num-proceses. Did you mean "
            "--num-processes?"), done.stderr
    done = _cli(["launch", "--zzzzzz", "x.py"], home)
    assert done.returncode == 2 and done.stderr.splitlines()[-1] == (
        "distlib launch: error: unknown option --zzzzzz. Run 'distlib launch --help' for the "
        "options.")


# ---- the migration table ------------------------------------------------------------------

def _migration_rows() -> list[tuple[list[str], list[str], str]]:
    text = (ROOT / "docs" / "migration.md").read_text()
    section = text.split("## Launcher flags", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[2].startswith(("`", "refused")):
            continue
        foreign = re.findall(r"`([^`]+)`", cells[0]) + re.findall(r"`([^`]+)`", cells[1])
        rows.append((foreign, re.findall(r"`([^`]+)`", cells[2]), cells[2]))
    return rows


def _outcome(argv: list[str], home: Path) -> dict:
    args = _parse(argv)
    resolved, _ = launch.resolve_config(args, {"HOME": str(home)})
    rest = {k: v for k, v in vars(args).items()
            if k not in SETTINGS and k not in ("strategy_shortcuts", "standalone",
                                               "rdzv_endpoint")}
    return {k: v for k, (v, _) in resolved.items()} | rest


def test_the_migration_table_matches_the_parser(home: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (home / "c.yaml").write_text("{}\n")
    rows = _migration_rows()
    assert len(rows) > 20
    listed: set[str] = set()
    for foreign, distlib_flags, cell in rows:
        for example in foreign:
            argv = shlex.split(example)
            listed.add(argv[0].split("=")[0].replace("_", "-"))
            if cell.startswith("refused"):
                with pytest.raises(SystemExit):
                    _parse(argv)
                assert distlib_flags[0] in capsys.readouterr().err, example
            else:
                assert _outcome(argv, home) == _outcome(shlex.split(distlib_flags[0]), home), (
                    example, distlib_flags[0])
    parser = Parser(prog="distlib launch")
    launch.add_arguments(parser)
    own = {f.replace("_", "-") for s in TABLE for f in (s.flag, "--no-" + s.flag[2:])}
    own |= {"--config-file", "--module", "-m", "--no-python", "--dry-run", "-h", "--help"}
    aliases = {f.replace("_", "-") for f in parser._option_string_actions} - own
    assert aliases <= listed, f"flags missing from docs/migration.md: {aliases - listed}"


def test_argparses_other_errors_read_cleanly(home: Path, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    for argv, last in (
            (["--num", "2", "x.py"], "distlib launch: error: ambiguous option: --num could "
             "match --num-processes, --num-machines, --num-threads, "
             "--num-cpu-threads-per-process. Write more of its name."),
            (["--cpu"], "distlib launch: error: the following arguments are required: script")):
        with pytest.raises(SystemExit) as stop:
            main(["launch", "--dry-run", *argv])
        assert stop.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == last


def test_a_missing_script_is_one_error_line(home: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    assert main(["launch", "--dry-run", "nope.py"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distlib launch: error: the script must exist, but got 'nope.py'")
    assert err.count("distlib launch") == 1, err
