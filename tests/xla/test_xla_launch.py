"""`distlib launch --strategy xla` and `launch(..., strategy="xla")` on the PJRT CPU client.

Each launch starts a fresh agent and XLA process (PJRT_DEVICE=CPU): one replica through
torch_xla's ``xmp.spawn``, SPMD over two CPU devices in one process, a replica that raises
(reported as the root cause, as for every strategy), and the layouts the CPU client cannot
run (refused before anything starts).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import distlib as dl
from distlib.errors import ConfigError, LaunchError
from distlib.launcher.launcher import launch

TIMEOUT = 240


def steps(env: dl.Env) -> list[float]:
    """Three SGD steps of a small model on fixed batches (split over the mesh under SPMD)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(24, 4, generator=gen),
                                          torch.randn(24, 2, generator=gen))
    loader = dl.shard(torch.utils.data.DataLoader(data, batch_size=8), env)
    model, optimizer = dl.wrap(model, env=env, optimizer=optimizer)
    losses = []
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(model(x), y)
        dl.backward(loss, model)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(dl.reduce(loss.detach(), env)))
    return losses


def replica() -> dict[str, object]:
    """Runs in the launched XLA process: what detect() sees, and a few training steps."""
    from distlib import _xla

    env = dl.detect()
    return {"strategy": repr(env.strategy), "device": env.device, "backend": env.backend,
            "rank": env.rank, "world_size": env.world_size, "launcher": env.launcher,
            "devices": _xla.num_devices(), "pjrt": os.environ.get("PJRT_DEVICE"),
            "losses": steps(env)}


def cpu_losses() -> list[float]:
    return steps(dl.Env())


def test_one_replica_through_xmp_spawn_trains_like_plain_cpu() -> None:
    (got,) = launch(replica, strategy="xla", num_processes=1, timeout_s=TIMEOUT)
    assert got["strategy"] == "XLA(sync_on_step=True, spmd=False)"
    assert (got["device"], got["backend"], got["launcher"]) == ("xla", "xla", "xmp")
    assert (got["rank"], got["world_size"], got["devices"], got["pjrt"]) == (0, 1, 1, "CPU")
    torch.testing.assert_close(got["losses"], cpu_losses(), rtol=1e-5, atol=1e-6)


def test_spmd_over_two_cpu_devices_in_one_process_trains_like_plain_cpu() -> None:
    (got,) = launch(replica, strategy="xla", strategy_options={"spmd": True},
                    num_processes=2, timeout_s=TIMEOUT)
    assert got["strategy"] == "XLA(sync_on_step=True, spmd=True)"
    assert (got["rank"], got["world_size"], got["devices"]) == (0, 1, 2)
    torch.testing.assert_close(got["losses"], cpu_losses(), rtol=1e-5, atol=1e-6)


def test_layouts_the_cpu_client_cannot_run_are_refused_before_starting() -> None:
    with pytest.raises(ConfigError, match=r"must be 1, but got 2.*SPMD"):
        launch(replica, strategy="xla", num_processes=2, timeout_s=TIMEOUT)
    with pytest.raises(ConfigError, match="not be 'xla' when `cpu` is true"):
        from distlib.launcher.config import resolve, to_plan

        to_plan(resolve({"strategy": "xla", "cpu": True}, {}, {}))


def fails() -> None:
    msg = "the replica's own error"
    raise ValueError(msg)


def test_a_failing_replica_is_the_root_cause_of_the_launch() -> None:
    with pytest.raises(LaunchError, match="rank 0 failed") as caught:
        launch(fails, strategy="xla", num_processes=1, timeout_s=TIMEOUT)
    assert "ValueError: the replica's own error" in str(caught.value)
    assert "in fails" in str(caught.value)  # the user's frame, not the bootstrap's


def test_cli_with_an_accelerate_tpu_config_launches_an_xla_process(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "accelerate.yaml"
    config.write_text(textwrap.dedent("""\
        compute_environment: LOCAL_MACHINE
        distributed_type: TPU
        downcast_bf16: 'no'
        mixed_precision: 'no'
        num_machines: 1
        num_processes: 1
        machine_rank: 0
        main_training_function: main
        tpu_use_cluster: false
        tpu_use_sudo: false
        use_cpu: false
        """))
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""\
        import sys
        import distlib as dl
        env = dl.detect()
        print("seen", env.strategy.name, env.device, env.launcher, env.world_size, flush=True)
        if sys.argv[1:] == ["--fail"]:
            raise RuntimeError("boom in the xla replica")
        """))
    environ = dict(os.environ, PJRT_DEVICE="CPU")
    base = [sys.executable, "-m", "distlib", "launch", "--config-file", str(config), str(script)]
    done = subprocess.run(base, env=environ, capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "seen xla xla xmp 1" in done.stdout
    failed = subprocess.run([*base, "--fail"], env=environ, capture_output=True, text=True,
                            timeout=TIMEOUT, check=False)
    assert failed.returncode == 1
    assert "rank 0 failed with exit code 1; this is the root cause" in failed.stderr
    assert "RuntimeError: boom in the xla replica" in failed.stderr
