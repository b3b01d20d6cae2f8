"""Pure pieces of the launcher: plans, child environments, payloads, fake Envs, results."""

from __future__ import annotations

import functools
import json
import os

import pytest

from distlib.errors import ConfigError
from distlib.launch._environ import child_environ
from distlib.launch._payload import dumps, loads
from distlib.launch.launcher import Failure, LaunchResult, root_cause_message
from distlib.launch.plan import LaunchPlan, parse_machines, plan_launch
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
    assert b"not_a_module" not in dumps(namespace["joined"])  # shipped as code
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
    from distlib.launch._environ import rank_threads

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
