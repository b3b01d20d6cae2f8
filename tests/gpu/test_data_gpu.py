"""On one GPU: `shard` moves batches to cuda:0, non-blocking from pinned memory, values intact."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import distlib as dl

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _loader(pin: bool) -> DataLoader:  # type: ignore[type-arg]
    x = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8)
    y = torch.arange(64)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False, pin_memory=pin)


@pytest.mark.parametrize("pin", [False, True])
def test_shard_moves_batches_to_the_gpu(pin: bool) -> None:
    env = dl.Env(device="cuda:0", backend="nccl")
    loader = dl.shard(_loader(pin), env)
    got = [(x, y) for x, y in loader]
    want = list(_loader(False))
    assert len(got) == len(want) == 4
    for (gx, gy), (wx, wy) in zip(got, want, strict=True):
        assert gx.device == torch.device("cuda:0") and gy.device == torch.device("cuda:0")
        torch.cuda.synchronize()
        assert torch.equal(gx.cpu(), wx) and torch.equal(gy.cpu(), wy)


def test_pinned_transfer_is_non_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    original = torch.Tensor.to

    def spy(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(bool(kwargs.get("non_blocking", False)))
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    loader = dl.shard(_loader(True), dl.Env(device="cuda:0", backend="nccl"))
    monkeypatch.setattr(torch.Tensor, "to", spy)
    batches = list(loader)
    monkeypatch.undo()
    assert batches and seen and all(seen), seen
