"""On one GPU: fp8 through torchao (Hopper), torch.compile, and tensor-parallel styles on a 1-GPU mesh.

Skipped without CUDA; the fp8 test also needs torchao (``.gpu-deps`` carries it to the GPU
machine, see ``tests/gpu/device_check.sh``).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import distlib as dl
from tests.gpu.test_train_gpu import nccl_group  # noqa: F401 (a fixture)
from tests.models import net, weights

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _batches(n: int = 6, width: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(32, width, generator=g), torch.randn(32, width, generator=g))
            for _ in range(n)]


def _fit(model: torch.nn.Module, env: dl.Env, **wrap_options: object) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = dl.wrap(model, dl.Single(), env=env, optimizer=opt, **wrap_options)
    losses = []
    for x, y in _batches():
        out = model(x.cuda())
        loss = torch.nn.functional.mse_loss(out.float(), y.cuda())
        dl.backward(loss, model)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
def test_fp8_trains_close_to_bf16_on_hopper() -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    env8 = dl.Env(device="cuda:0", backend="nccl", precision="fp8")
    model8 = net(64, 128, 128, 64)
    losses8 = _fit(model8, env8)
    names = {type(m).__name__ for m in dl.unwrap(model8).modules()}
    assert "Float8Linear" in names, names  # the linear layers really run in float8
    losses16 = _fit(net(64, 128, 128, 64), dl.Env(device="cuda:0", backend="nccl",
                                                   precision="bf16"))
    assert losses8[-1] < losses8[0]
    assert abs(losses8[-1] - losses16[-1]) < 0.1 * abs(losses16[-1]) + 0.05


def test_compiled_model_trains_like_eager() -> None:
    env = dl.Env(device="cuda:0", backend="nccl")
    eager = net(64, 64, 64)
    compiled = net(64, 64, 64)
    want = _fit(eager, env)
    got = _fit(compiled, env, compile=True)
    assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-3, atol=1e-4)
    for key, value in weights(eager).items():
        torch.testing.assert_close(weights(compiled)[key], value, rtol=1e-3, atol=1e-4)


@pytest.mark.usefixtures("nccl_group")
def test_tensor_parallel_styles_on_a_one_gpu_mesh() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from distlib.training.tp import apply_tensor_parallel, plan_tensor_parallel

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 32)).cuda()
    sharded = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                  torch.nn.Linear(64, 32)).cuda()
    sharded.load_state_dict(plain.state_dict())
    mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("tp",))
    plan = plan_tensor_parallel(sharded, {"0": "colwise", "2": "rowwise"}, 1)
    apply_tensor_parallel(sharded, mesh, plan)
    assert isinstance(sharded[0].weight, DTensor) and isinstance(sharded[2].weight, DTensor)
    x = torch.randn(8, 32, device="cuda")
    torch.testing.assert_close(sharded(x), plain(x))
    sharded(x).sum().backward()
    plain(x).sum().backward()
    torch.testing.assert_close(sharded[0].weight.grad.full_tensor(), plain[0].weight.grad)
