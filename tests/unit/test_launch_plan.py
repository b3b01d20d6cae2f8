"""Pure pieces of the launcher: plans, child environments, payloads, fake Envs, results."""

from __future__ import annotations

import functools
import json
import os
import pickle

import pytest

from distlib.errors import ConfigError
from distlib.launcher._environ import child_environ
from distlib.launcher._payload import dumps, loads
from distlib.launcher.launcher import Failure, LaunchResult, root_cause_message
from distlib.launcher.plan import LaunchPlan, parse_machines, plan_launch
from distlib.testing import fake_env, free_port


def test_total_processes_are_split_over_machines() -> None:
    plan = plan_launch(num_processes=4, num_machines=2, main_port=29400)
    assert (plan.nproc_per_node, plan.max_machines, plan.world_size) == (2, 2, 4)
    assert plan_launch(nproc_per_node=3, num_machines=2, main_port=1).world_size == 6
    assert plan_launch(num_processes=2, cpu=True).nproc_per_node == 2
    assert plan_launch().nproc_per_node is None and plan_launch().world_size is None


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"num_processes": 3, "num_machines": 2, "main_port": 1}, ["multiple", "3"]),
    ({"num_processes": 4, "nproc_per_node": 3, "num_machines": 2, "main_port": 1},
     ["nproc_per_node", "3"]),
    ({"num_processes": 4, "num_machines": "1:2", "rdzv_backend": "c10d", "main_port": 1},
     ["elastic"]),
    ({"num_machines": "2:1"}, ["MIN <= MAX"]),
    ({"num_machines": "two"}, ["'two'"]),
    ({"num_processes": 0}, ["num_processes", ">= 1"]),
    ({"num_machines": 2}, ["main_port", "fixed port"]),
    ({"machine_rank": 2, "num_machines": 2, "main_port": 1}, ["machine_rank", "2"]),
    ({"rdzv_backend": "etcd"}, ["rdzv_backend", "'static', 'c10d'", "'etcd'"]),
    ({"nproc_per_node": 2, "num_machines": "1:2", "main_port": 1}, ["c10d"]),
    ({"precision": "fp64"}, ["precision", "fp64"]),
    ({"strategy": "ddp", "strategy_options": {"zero_stage": 3}}, ["zero_stage"]),
    ({"strategy_options": {"static_graph": True}}, ["without a strategy"]),
    ({"max_restarts": -1}, ["max_restarts"]),
    ({"main_port": 70000}, ["main_port", "70000"]),
])
def test_bad_plans_name_the_field_and_value(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        plan_launch(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_parse_machines() -> None:
    assert parse_machines("1:4") == (1, 4) and parse_machines(" 3 ") == (3, 3)


def test_child_environ_sets_the_plan_and_leaves_the_base_alone() -> None:
    base = {"HOME": "/h", "DISTLIB_PRECISION": "fp16", "DISTLIB_DEBUG": "1",
            "PYTHONPATH": "/extra"}
    frozen = dict(base)
    plan = LaunchPlan(nproc_per_node=2, cpu=True, strategy="deepspeed",
                      strategy_options={"zero_stage": 3}, collective_timeout_s=60,
                      gpu_ids="0,1")
    env = child_environ(base, plan, sys_path=["", "/proj/tests", "/usr/lib/py"], cwd="/proj",
                        skip_prefixes=["/usr/lib"])
    assert base == frozen
    assert env["DISTLIB_LAUNCHED"] == "1" and env["DISTLIB_CPU"] == "1"
    assert env["DISTLIB_STRATEGY"] == "deepspeed"
    assert json.loads(env["DISTLIB_STRATEGY_OPTIONS"]) == {"zero_stage": 3}
    assert env["DISTLIB_TIMEOUT"] == "60" and env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert "DISTLIB_PRECISION" not in env and "DISTLIB_DEBUG" not in env
    assert env["PYTHONPATH"].split(os.pathsep) == ["/proj/", "/proj/tests", "/extra"]
    assert "OMP_NUM_THREADS" not in env and env["HOME"] == "/h"  # the agent sets it per rank


def test_child_environ_round_trips_through_detect() -> None:
    from distlib.env import Hardware, detect
    from distlib.strategies.fsdp import FSDP

    plan = LaunchPlan(nproc_per_node=2, cpu=True, precision="bf16", strategy="fsdp",
                      strategy_options={"cpu_offload": True}, debug=True,
                      collective_timeout_s=30)
    env = child_environ({}, plan) | {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                     "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "29411"}
    got = detect(env, hardware=Hardware(num_gpus=4))
    assert (got.rank, got.launcher, got.device, str(got.precision)) == (1, "distlib", "cpu",
                                                                        "bf16")
    assert got.strategy == FSDP(cpu_offload=True) and got.debug and got.timeout_s == 30.0


def _module_level(x: int) -> int:
    return x + 1


def test_payload_ships_module_functions_by_reference_and_closures_by_value() -> None:
    factor = 5

    def local(x, *, k=2):
        return os.path.join("a", str(x * factor * k))

    target, args = loads(dumps((functools.partial(local, k=3), (2,))))
    assert target(*args) == os.path.join("a", "30")
    assert b"_module_level" in dumps(_module_level)
    assert loads(dumps(_module_level))(1) == 2
    assert loads(dumps(lambda y: y * factor))(2) == 10
    namespace: dict = {"__name__": "not_a_module"}
    exec("import os\ndef joined(x):\n    return os.path.join('b', x)\n", namespace)
    with pytest.raises(pickle.PicklingError):  # by reference it could not travel ...
        pickle.dumps(namespace["joined"])
    assert b"cloudpickle" in dumps(namespace["joined"])  # ... so it is shipped by value
    assert loads(dumps(namespace["joined"]))("c") == os.path.join("b", "c")


def test_fake_env_derives_local_fields() -> None:
    env = fake_env(rank=5, world_size=8, num_nodes=2, precision="fp16")
    assert (env.local_rank, env.local_world_size, env.node_rank, str(env.precision)) == (
        1, 4, 1, "fp16")
    assert fake_env().world_size == 1 and fake_env(1, 2).strategy.name == "ddp"
    assert 0 < free_port() < 65536


def test_launch_result_and_root_cause_text() -> None:
    result = LaunchResult(returns={1: "b", 0: "a"})
    assert list(result) == ["a", "b"] and result[0] == "a" and len(result) == 2
    failures = [Failure(rank=1, exitcode=1, traceback="Traceback...\nValueError: x\n"),
                Failure(rank=0, exitcode=-15)]
    text = root_cause_message("launch()", failures)
    assert text.startswith("launch(): rank 1 failed with exit code 1")
    assert "ValueError: x" in text and "rank 0 (exit code -15)" in text
    assert "SIGTERM" in root_cause_message("launch()", [], "SIGTERM")
    both = [failures[0], Failure(rank=0, exitcode=1, traceback="Traceback...\nOSError: y\n")]
    assert "OSError" not in root_cause_message("launch()", both)
    lost = Failure(rank=2, exitcode=1, traceback="RuntimeError: Connection closed by peer",
                   secondary=True)
    assert "another machine" in root_cause_message("distlib launch", [lost])
    assert "rank 0:\nTraceback...\nOSError: y" in root_cause_message("launch()", both,
                                                                    every_traceback=True)


@pytest.mark.parametrize(("plan", "environ", "nproc", "gpus", "cpus", "expected"), [
    (LaunchPlan(), {}, 2, False, 2, 1),            # 2 CPU ranks on 2 cores: one each
    (LaunchPlan(), {}, 2, False, 16, 8),           # the cores shared among CPU ranks
    (LaunchPlan(), {}, 3, False, 16, 5),
    (LaunchPlan(), {}, 32, False, 16, 1),          # never below one
    (LaunchPlan(), {}, 4, True, 64, 1),            # GPU ranks: one thread, as torchrun
    (LaunchPlan(), {}, 1, False, 16, None),        # one rank keeps torch's default
    (LaunchPlan(), {"OMP_NUM_THREADS": "3"}, 2, False, 16, 3),   # the user's variable wins
    (LaunchPlan(num_threads=4), {"OMP_NUM_THREADS": "3"}, 2, False, 16, 4),  # the flag wins
    (LaunchPlan(num_threads=2), {}, 1, True, 16, 2),
    (LaunchPlan(strategy="xla"), {}, 1, False, 16, None),
])
def test_rank_threads(plan: LaunchPlan, environ: dict[str, str], nproc: int, gpus: bool,
                      cpus: int, expected: int | None) -> None:
    from distlib.launcher._environ import rank_threads

    assert rank_threads(plan, environ, nproc=nproc, gpu_ranks=gpus, num_cpus=cpus) == expected


@pytest.mark.parametrize("value", ["", "0", "-1", "two", "1.5", " ", "4x"])
def test_a_malformed_omp_num_threads_is_refused_before_launch(value: str) -> None:
    with pytest.raises(ConfigError, match=r"OMP_NUM_THREADS must be a whole number >= 1, but "
                       rf"got OMP_NUM_THREADS={value!r}\. Unset it, or pass --num-threads"):
        child_environ({"OMP_NUM_THREADS": value}, LaunchPlan(nproc_per_node=2))


@pytest.mark.parametrize("value", [0, -2, True, "2", 1.0])
def test_num_threads_must_be_a_positive_int(value: object) -> None:
    with pytest.raises(ConfigError, match="num_threads must be"):
        LaunchPlan(num_threads=value)  # type: ignore[arg-type]


def test_one_timeout_default_for_rendezvous_and_collectives() -> None:
    """Help, dry run, the agent's rendezvous and Env agree on one documented default."""
    import argparse
    from pathlib import Path

    from distlib.cli import launch as launch_command
    from distlib.env import Env
    from distlib.launcher._agent import _launch_config
    from distlib.launcher.plan import DEFAULT_TIMEOUT_S
    from distlib.launcher.settings import SETTINGS

    assert f"(default {DEFAULT_TIMEOUT_S})" in SETTINGS["timeout"].help
    assert Env.__dataclass_fields__["timeout_s"].default == DEFAULT_TIMEOUT_S
    for backend in ("static", "c10d"):
        configs = _launch_config(LaunchPlan(nproc_per_node=2, cpu=True, rdzv_backend=backend),
                                 "/tmp", "fork").rdzv_configs
        assert configs["timeout"] == DEFAULT_TIMEOUT_S
        assert configs.get("join_timeout", DEFAULT_TIMEOUT_S) == DEFAULT_TIMEOUT_S
    chosen = _launch_config(LaunchPlan(nproc_per_node=2, collective_timeout_s=7,
                                       rdzv_backend="c10d"), "/tmp", "fork").rdzv_configs
    assert chosen["timeout"] == chosen["join_timeout"] == 7
    parser = argparse.ArgumentParser()
    launch_command.add_arguments(parser)
    args = parser.parse_args(["--cpu", "--num-processes", "2", "--dry-run", __file__])
    resolved, config = launch_command.resolve_config(args, {})
    text = launch_command.dry_run_text(resolved, launch_command.to_plan(resolved), ["x"],
                                       config, {})
    assert any(row.split()[:3] == ["timeout", str(DEFAULT_TIMEOUT_S), "s"]
               for row in text.splitlines())
    assert any(row.split()[:2] == ["stall_timeout", "off"] for row in text.splitlines())
    docs = (Path(__file__).parents[2] / "docs" / "launch.md").read_text()
    assert f"default {DEFAULT_TIMEOUT_S} s" in docs and "--stall-timeout S" in docs


@pytest.mark.parametrize("value", [0, -1.5, float("inf"), float("nan"), True, "3"])
def test_stall_timeout_must_be_positive_seconds(value: object) -> None:
    with pytest.raises(ConfigError, match=r"stall_timeout_s must be a number of seconds > 0 "
                                          r"\(None: no stall detection\), but got .*\. Pass "
                                          r"--stall-timeout S"):
        LaunchPlan(stall_timeout_s=value)  # type: ignore[arg-type]
    plan = LaunchPlan(nproc_per_node=2, stall_timeout_s=2.5)
    assert child_environ({}, plan)["DISTLIB_STALL_TIMEOUT"] == "2.5"
    assert "DISTLIB_STALL_TIMEOUT" not in child_environ({"DISTLIB_STALL_TIMEOUT": "9"},
                                                        LaunchPlan())


def test_the_report_names_signals_finished_ranks_hangs_and_attempts() -> None:
    from distlib.launcher.launcher import Outcome

    killed = Failure(rank=1, exitcode=-9, signal=9)
    lost = Failure(rank=0, exitcode=1, traceback="Traceback...\nRuntimeError: Connection "
                   "closed by peer\n", secondary=True, where="t.py:9 waiting in all_reduce",
                   collective="all_reduce")
    text = root_cause_message("x", [killed, lost], outcome=Outcome(ok=False))
    assert text.startswith("x: rank 1 was killed by signal 9 (SIGKILL) — out of memory? "
                           "(see `dmesg`); this is the root cause")
    assert "another machine" not in text and "rank 0 (exit code 1)" in text
    one = Outcome(ok=False, finished=(1,))
    assert ("rank 1 had finished (its target returned) while rank 0 still waited in "
            "all_reduce at t.py:9, which rank 1 never joined") in root_cause_message(
                "x", [lost], outcome=one)
    assert "another machine" not in root_cause_message("x", [lost], outcome=Outcome(ok=False))
    assert "another machine" in root_cause_message("x", [lost], outcome=Outcome(
        ok=False, machines=2))
    hang = {"reason": "stall", "ranks": [0], "seconds": 2.0,
            "lines": ["rank 0: t.py:9 waiting in all_reduce", "rank 1: t.py:4 in <module>"],
            "stacks": {"1": '  File "t.py", line 4, in <module>'}}
    text = root_cause_message("x", [lost], outcome=Outcome(ok=False, hang=hang,
                                                          attempts=("attempt 1 of 2 failed",)))
    assert text.splitlines()[:4] == [
        "x: attempt 1 of 2 failed",
        "x: rank 0 made no progress in a collective for 2.0 s (the stall timeout); every "
        "rank was stopped.", "Where each rank was:", "  rank 0: t.py:9 waiting in all_reduce"]
    assert 'rank 1 (most recent call last):\n  File "t.py", line 4' in text
    assert root_cause_message("x", [], outcome=Outcome(ok=False, error="port busy")) == (
        "x: port busy")


def test_stacks_are_read_and_described() -> None:
    from distlib.launcher._hang import describe, frames_of_stack, hang_lines

    dump = ("Thread 0x01 (most recent call first):\n"
            '  File "/usr/lib/python3.11/threading.py", line 320 in wait\n\n'
            "Current thread 0x02 (most recent call first):\n"
            '  File "/v/torch/distributed/distributed_c10d.py", line 3252 in all_reduce\n'
            '  File "/v/torch/distributed/c10d_logger.py", line 83 in wrapper\n'
            '  File "/v/distlib/collectives.py", line 40 in reduce\n'
            '  File "/w/train.py", line 50 in step\n'
            '  File "/v/distlib/launcher/_bootstrap.py", line 99 in main\n')
    frames = frames_of_stack(dump)
    assert frames[0][2] == "main" and frames[-1][2] == "all_reduce"
    assert describe(frames) == ("train.py:50 waiting in all_reduce", "all_reduce")
    assert describe(frames[:2])[1] == ""  # not in a collective
    assert hang_lines({0: {"where": "a", "collective": "barrier"}, 1: {"where": "b"}})[-1] == (
        "not in a collective while others wait: rank 1 (the likely cause)")
    assert len(hang_lines({0: {"where": "a", "collective": "barrier"}})) == 1
