"""On one GPU: save_state / load_state round-trip CUDA weights, optimizer state and the CUDA RNG."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distlib as dl
from tests.models import net, weights

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = net(16, 32, 32, 4).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(torch.randn(8, 16, device="cuda")).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_save_and_load_cuda_state_and_rng(tmp_path: Path) -> None:
    env = dl.Env(device="cuda:0", backend="nccl")
    model, opt = _trained()
    torch.cuda.manual_seed(123)
    torch.rand(3, device="cuda")  # move the CUDA generator off its seed
    dl.save_state(tmp_path / "ckpt", env, model=model, optimizer=opt, step=3)
    want_next = torch.rand(5, device="cuda").cpu()
    want_weights = weights(model)
    want_moments = opt.state_dict()["state"][0]["exp_avg"].cpu()

    fresh, fresh_opt = net(16, 32, 32, 4).cuda(), None
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    torch.cuda.manual_seed(999)
    extra = dl.load_state(tmp_path / "ckpt", env, model=fresh, optimizer=fresh_opt)
    assert extra.get("step") == 3
    assert all(p.device.type == "cuda" for p in fresh.parameters())
    got = weights(fresh)
    for key in want_weights:
        torch.testing.assert_close(got[key], want_weights[key], rtol=0, atol=0)
    torch.testing.assert_close(fresh_opt.state_dict()["state"][0]["exp_avg"].cpu(), want_moments)
    assert fresh_opt.state_dict()["state"][0]["exp_avg"].device.type == "cuda"
    # the CUDA generator continues exactly where it was saved
    assert torch.equal(torch.rand(5, device="cuda").cpu(), want_next)
