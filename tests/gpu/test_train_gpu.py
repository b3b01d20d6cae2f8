"""On one GPU (NCCL, world size 1): every strategy trains like `Single`; fp16 scaling, bf16.

Skipped without CUDA. Run on a GPU machine with ``pytest tests/gpu -v`` (about a minute).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo  # its import sets TORCHINDUCTOR_CACHE_DIR; do it before the leak check
import torch.distributed as dist

import distlib as dl
from tests.models import net, train, weights

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _env(precision: str = "no") -> dl.Env:
    return dl.Env(device="cuda:0", backend="nccl", precision=precision)


@pytest.fixture
def nccl_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A one-rank NCCL group; LOCAL_RANK as a launcher sets it (DeepSpeed reads it)."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # deepspeed's import sets it
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("cuda:0"))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _net() -> torch.nn.Module:
    return net(64, 64, 64, 8)


def _run(strategy: Any, env: dl.Env, *, steps: int = 2, overflow: bool = False) -> Any:
    """Wrap `_net` with ``strategy`` and train it on 8 batches of 16 rows on the GPU."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt = dl.wrap(model, strategy, env=env, optimizer=opt)
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)) for _ in range(8)]
    train([(model, opt)], data, steps=steps, clip=1.0, overflow=overflow, device="cuda",
          out_dtype=torch.float32)
    return model, opt


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)


STRATEGIES = {
    "ddp": dl.DDP(),
    "fsdp": dl.FSDP(wrap_classes=("Block",)),
    "zero2": dl.DeepSpeed(zero_stage=2),
    "zero3": dl.DeepSpeed(zero_stage=3),
}


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_on_one_gpu_matches_single(nccl_group: None, name: str,
                                            precision: str) -> None:
    if name.startswith("zero"):
        pytest.importorskip("deepspeed")
    env = _env(precision)
    want = weights(_run(dl.Single(), env)[0])
    got = weights(_run(STRATEGIES[name], env)[0])
    _close(got, want, 1e-5 if precision == "no" else 3e-2)


def test_fp16_scaler_skips_an_overflow_on_gpu(nccl_group: None) -> None:
    env = _env("fp16")
    for strategy in (dl.Single(), dl.DDP(), dl.FSDP()):
        _model, opt = _run(strategy, env, overflow=True)
        assert opt.skipped_steps == 1, strategy
        assert opt.scaler.get_scale() < 65536.0


def test_accumulation_on_gpu_equals_full_batches(nccl_group: None) -> None:
    env = _env()
    accumulated = weights(_run(dl.DDP(), env, steps=2)[0])
    model = _net().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)) for _ in range(8)]
    for i in range(0, 8, 2):
        x = torch.cat([data[i][0], data[i + 1][0]]).cuda()
        y = torch.cat([data[i][1], data[i + 1][1]]).cuda()
        torch.nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    _close(accumulated, {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
           1e-5)

