"""The environment `distlib launch --strategy xla` gives its XLA process (pure; no torch_xla)."""

from __future__ import annotations

import json

import pytest

from distlib.errors import ConfigError
from distlib.launcher._environ import child_environ
from distlib.launcher.plan import LaunchPlan


def xla(**options: object) -> dict[str, str]:
    base = options.pop("base", {})
    plan = LaunchPlan(strategy="xla", **options)  # type: ignore[arg-type]
    return child_environ(base, plan)  # type: ignore[arg-type]


def test_one_replica_or_every_device_through_xmp_spawn() -> None:
    env = xla(nproc_per_node=1, base={"PJRT_DEVICE": "CPU"})
    assert (env["PJRT_DEVICE"], env["DISTLIB_XLA_REPLICAS"]) == ("CPU", "1")
    assert "XLA_USE_SPMD" not in env and "CPU_NUM_DEVICES" not in env
    assert "OMP_NUM_THREADS" not in env  # one process per machine: its threads are its own
    tpu = xla(nproc_per_node=4, base={"PJRT_DEVICE": "TPU"})
    assert (tpu["PJRT_DEVICE"], tpu["DISTLIB_XLA_REPLICAS"]) == ("TPU", "all")
    assert "CPU_NUM_DEVICES" not in tpu


def test_spmd_is_one_process_over_n_cpu_devices() -> None:
    for env in (xla(nproc_per_node=2, strategy_options={"spmd": True},
                    base={"PJRT_DEVICE": "CPU"}),
                xla(nproc_per_node=2, base={"PJRT_DEVICE": "CPU", "XLA_USE_SPMD": "1"})):
        assert (env["XLA_USE_SPMD"], env["CPU_NUM_DEVICES"]) == ("1", "2")
        assert json.loads(env["DISTLIB_STRATEGY_OPTIONS"]) == {"spmd": True}
        assert "DISTLIB_XLA_REPLICAS" not in env


def test_several_replicas_on_the_cpu_client_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"must be 1, but got 2.*pytorch/xla#9089"):
        xla(nproc_per_node=2, base={"PJRT_DEVICE": "CPU"})


def test_inherited_xla_replica_setting_is_dropped_for_other_strategies() -> None:
    env = child_environ({"DISTLIB_XLA_REPLICAS": "1"}, LaunchPlan(nproc_per_node=2, cpu=True))
    assert "DISTLIB_XLA_REPLICAS" not in env and "PJRT_DEVICE" not in env
