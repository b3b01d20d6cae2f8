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


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(Block(64), Block(64), torch.nn.Linear(64, 8))


def _train(strategy: Any, env: dl.Env, *, steps: int = 2, overflow: bool = False) -> Any:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt = dl.wrap(model, strategy, env=env, optimizer=opt)
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)) for _ in range(8)]
    for (x, y), micro in dl.accumulate(data, steps=steps):
        out = model(x.cuda())
        assert out.dtype == torch.float32
        loss = torch.nn.functional.mse_loss(out, y.cuda())
        if overflow and micro.step == 0:
            loss = loss * 1e30
        dl.backward(loss, model, micro)
        if micro.sync:
            dl.clip_grad_norm(model, 1.0)
            opt.step()
            opt.zero_grad()
    return model, opt


def _weights(model: Any) -> dict[str, torch.Tensor]:
    inner = dl.unwrap(model)
    params = list(inner.parameters())
    if hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().float().cpu().clone() for k, v in inner.state_dict().items()}
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().cpu()
            for k, v in inner.state_dict().items()}


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
    want = _weights(_train(dl.Single(), env)[0])
    got = _weights(_train(STRATEGIES[name], env)[0])
    _close(got, want, 1e-5 if precision == "no" else 3e-2)


def test_fp16_scaler_skips_an_overflow_on_gpu(nccl_group: None) -> None:
    env = _env("fp16")
    for strategy in (dl.Single(), dl.DDP(), dl.FSDP()):
        _model, opt = _train(strategy, env, overflow=True)
        assert opt.skipped_steps == 1, strategy
        assert opt.scaler.get_scale() < 65536.0


def test_accumulation_on_gpu_equals_full_batches(nccl_group: None) -> None:
    env = _env()
    accumulated = _weights(_train(dl.DDP(), env, steps=2)[0])
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

