"""The XLA strategy on one XLA device of the PJRT CPU client, against plain CPU torch."""

from __future__ import annotations

import copy

import pytest
import torch

import distlib as dl
from distlib import _xla
from distlib.errors import CollectiveError, PrecisionError, StrategyError
from distlib.strategies.xla import XLA
from distlib.training.xla import XLAOptimizer, apply

ENV = dl.Env(device="xla", backend="xla", strategy="xla")


class Tied(torch.nn.Module):
    """Embedding and output layer sharing one weight, plus a BatchNorm (buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(6, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.out = torch.nn.Linear(4, 6, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.embed(ids))))


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen))
            for _ in range(n)]


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object,
          device: torch.device) -> list[float]:
    """The DESIGN loop: forward, dl.backward, step, scheduler, zero_grad."""
    losses = []
    for x, y in batches():
        loss = torch.nn.functional.mse_loss(model(x.to(device)), y.to(device))
        dl.backward(loss, model)
        optimizer.step()
        scheduler.step()  # type: ignore[attr-defined]
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return _xla.to_cpu(dict(dl.unwrap(model).state_dict()))  # type: ignore[no-any-return]


def test_placement_moves_everything_and_keeps_ties() -> None:
    model = Tied()
    reference = copy.deepcopy(model).eval()
    wrapped = dl.wrap(model, XLA(), env=ENV)
    assert wrapped is model
    assert {p.device.type for p in model.parameters()} == {"xla"}
    assert {b.device.type for b in model.buffers()} == {"xla"}
    assert model.out.weight is model.embed.weight  # module.to("xla") would untie them
    ids = torch.tensor([0, 3, 5, 1])
    got = model.eval()(ids.to(_xla.device())).cpu()
    torch.testing.assert_close(got, reference(ids), rtol=1e-5, atol=1e-6)


def test_optimizer_step_equals_plain_cpu() -> None:
    cpu_model = mlp()
    cpu_opt = torch.optim.AdamW(cpu_model.parameters(), lr=0.05, weight_decay=0.1)
    cpu_sched = torch.optim.lr_scheduler.StepLR(cpu_opt, step_size=2, gamma=0.5)
    cpu_losses = train(cpu_model, cpu_opt, cpu_sched, torch.device("cpu"))

    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    model, xopt, xsched = dl.wrap(model, XLA(), env=ENV, optimizer=opt, scheduler=sched)
    assert isinstance(xopt, XLAOptimizer) and xopt.optimizer is opt and xsched is sched
    losses = train(model, xopt, xsched, _xla.device())

    assert losses == pytest.approx(cpu_losses, rel=1e-5)
    assert xopt.param_groups[0]["lr"] == cpu_opt.param_groups[0]["lr"] == 0.0125
    for name, value in cpu_model.state_dict().items():
        torch.testing.assert_close(cpu_state(model)[name], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_xla.to_cpu(xopt.state_dict()["state"]),
                               cpu_opt.state_dict()["state"], rtol=1e-5, atol=1e-6)


def test_optimizer_state_from_before_wrap_is_moved_and_kept() -> None:
    cpu_model = mlp()
    cpu_opt = torch.optim.SGD(cpu_model.parameters(), lr=0.1, momentum=0.9)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    for m, o in ((cpu_model, cpu_opt), (model, opt)):  # one step on the CPU: momentum exists
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()
        o.zero_grad()
    model, xopt = dl.wrap(model, XLA(), env=ENV, optimizer=opt)
    assert all(s["momentum_buffer"].device.type == "xla" for s in opt.state.values())
    train(cpu_model, cpu_opt, torch.optim.lr_scheduler.ConstantLR(cpu_opt, factor=1.0),
          torch.device("cpu"))
    train(model, xopt, torch.optim.lr_scheduler.ConstantLR(xopt, factor=1.0), _xla.device())
    for name, value in cpu_model.state_dict().items():
        torch.testing.assert_close(cpu_state(model)[name], value, rtol=1e-5, atol=1e-6)


def test_sync_on_step_cuts_the_graph() -> None:
    import torch_xla.debug.metrics as met

    for sync in (True, False):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, xopt = dl.wrap(model, XLA(sync_on_step=sync), env=ENV, optimizer=opt)
        x, y = batches(1)[0]
        dl.backward(torch.nn.functional.mse_loss(model(x.to(_xla.device())),
                                                 y.to(_xla.device())), model)
        before = met.counter_value("MarkStep") or 0
        xopt.step()
        ran = (met.counter_value("MarkStep") or 0) > before
        assert ran is sync, f"sync_on_step={sync}: graph cut at step() = {ran}"
        _xla.sync()


def test_bf16_runs_under_autocast_with_fp32_outputs() -> None:
    env = dl.Env(device="xla", backend="xla", strategy="xla", precision="bf16")
    cpu_model = mlp()
    model = dl.wrap(mlp(), XLA(), env=env)
    x = batches(1)[0][0]
    out = model(x.to(_xla.device()))
    assert out.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = cpu_model(x).float()
    exact = cpu_model(x)
    torch.testing.assert_close(out.cpu(), expected, rtol=2e-2, atol=2e-2)
    assert not torch.allclose(out.cpu(), exact, rtol=1e-6, atol=1e-7)  # really computed in bf16
    dl.backward(out.square().mean(), model)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("precision", ["fp16", "fp8"])
def test_precisions_tpus_cannot_run_are_refused(precision: str) -> None:
    env = dl.Env(device="xla", backend="xla", precision=precision)
    with pytest.raises(PrecisionError, match="'no' or 'bf16'"):
        apply(mlp(), XLA(), env)


def test_refusals() -> None:
    model = mlp()
    foreign = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    with pytest.raises(StrategyError, match="only hold the model's parameters"):
        apply(model, XLA(), ENV, optimizer=foreign)
    with pytest.raises(StrategyError, match="XLA_USE_SPMD"):
        apply(mlp(), XLA(spmd=True), ENV)
    # torchrun-style processes on the CPU client: each would be a world of one
    two_ranks = dl.Env(rank=0, world_size=2, device="xla", backend="xla")
    with pytest.raises(StrategyError, match="one replica"):
        apply(mlp(), XLA(), two_ranks)
    with pytest.raises(TypeError, match="sync_on_step"):
        XLA(sync_on_step=1)  # type: ignore[arg-type]


def test_single_replica_runtime_and_collectives() -> None:
    assert _xla.is_available() and not _xla.is_spmd()
    assert _xla.runtime_ranks() == {"rank": 0, "world_size": 1, "local_rank": 0,
                                    "local_world_size": 1, "node_rank": 0, "num_nodes": 1}
    x = torch.tensor([1.0, -2.0, 3.0], device=_xla.device())
    for op in ("sum", "mean", "max", "min"):
        torch.testing.assert_close(_xla.all_reduce(x, op).cpu(), x.cpu())
    torch.testing.assert_close(_xla.all_gather(x).cpu(), x.cpu())
    torch.testing.assert_close(_xla.broadcast(x.clone()).cpu(), x.cpu())
    _xla.barrier("distlib-test")
    with pytest.raises(CollectiveError, match="'sum', 'mean', 'max', 'min'"):
        _xla.all_reduce(x, "prod")
    loader = _xla.device_loader(torch.utils.data.DataLoader(torch.arange(6.0), batch_size=3))
    got = [b for b in loader]
    assert [b.device.type for b in got] == ["xla", "xla"]
    assert torch.cat([b.cpu() for b in got]).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_state_saved_under_xla_loads_on_plain_cpu_and_back(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "model.pt"
    model = dl.wrap(Tied(), XLA(), env=ENV)
    torch.save(_xla.to_cpu(dl.unwrap(model).state_dict()), path)
    plain = Tied()
    plain.load_state_dict(torch.load(path, weights_only=True))
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(value, cpu_state(model)[name])
    again = dl.wrap(Tied(), XLA(), env=ENV)
    dl.unwrap(again).load_state_dict(torch.load(path, weights_only=True))
    assert again.out.weight is again.embed.weight
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(cpu_state(again)[name], value)
