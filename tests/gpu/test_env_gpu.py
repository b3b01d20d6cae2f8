"""On one GPU: detect() picks cuda:0 and NCCL, a launched rank sees it, and collectives run on CUDA.

Skipped without CUDA (the CPU suite runs ``tests/gpu/device_check.sh`` as a dry run instead).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

import distlib as dl

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_detect_picks_the_gpu_and_nccl() -> None:
    env = dl.detect({})
    assert env.device == "cuda:0"
    assert env.backend == "nccl"
    assert env.torch_device == torch.device("cuda:0")


def test_detect_with_cpu_flag_stays_on_the_cpu() -> None:
    env = dl.detect({"DISTLIB_CPU": "1"})
    assert env.device == "cpu"
    assert env.backend == "gloo"


def _rank_view() -> dict[str, Any]:
    env = dl.detect()
    dl.runtime.initialize(env)
    out = {"device": env.device, "backend": env.backend, "world": env.world_size,
           "current": torch.cuda.current_device()}
    # a one-rank NCCL group, as a launched single-GPU job would hold for collectives
    store = dist.HashStore()
    dist.init_process_group("nccl", store=store, rank=0, world_size=1,
                            device_id=torch.device(env.device))
    try:
        x = torch.arange(4.0, device=env.device)
        gathered = dl.gather(x, dl.Env(device=env.device, backend="nccl"))
        total = dl.reduce(x.sum(), dl.Env(device=env.device, backend="nccl"), op="sum")
        out["gathered"] = gathered.cpu().tolist()
        out["total"] = float(total)
        out["group_backend"] = dist.get_backend()
    finally:
        dist.destroy_process_group()
    return out


def test_a_launched_rank_runs_on_cuda_with_nccl() -> None:
    result = dl.launch(_rank_view, num_processes=1, timeout_s=180)
    view = result[0]
    assert view["device"] == "cuda:0" and view["backend"] == "nccl", view
    assert view["current"] == 0
    assert view["group_backend"] == "nccl"
    assert view["gathered"] == [0.0, 1.0, 2.0, 3.0]
    assert view["total"] == 6.0
