"""save_state / load_state between the XLA strategy (PJRT CPU client) and plain CPU torch."""

from __future__ import annotations

import pathlib

import torch
from torch.utils.data import DataLoader

import distlib as dl
from distlib import _xla
from distlib.strategies.xla import XLA

ENV = dl.Env(device="xla", backend="xla", strategy="xla")
CPU = dl.Env()


def parts(env: dl.Env, seed: int) -> tuple[torch.nn.Module, object, object, dl.ShardedLoader]:
    """A model, AdamW, a scheduler and a sharded loader; wrapped under XLA when env says so."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(24, 4, generator=gen),
                                          torch.randn(24, 2, generator=gen))
    loader = dl.shard(DataLoader(data, batch_size=4, shuffle=True,
                                 generator=torch.Generator().manual_seed(2)), env)
    if env.backend == "xla":
        model, optimizer, scheduler = dl.wrap(model, XLA(), env=env, optimizer=optimizer,
                                              scheduler=scheduler)
    return model, optimizer, scheduler, loader


def train(model: torch.nn.Module, optimizer: object, scheduler: object, batches: object,
          steps: int) -> None:
    for _, (x, y) in zip(range(steps), batches, strict=False):  # type: ignore[call-overload]
        dl.backward(torch.nn.functional.mse_loss(model(x), y), model)
        optimizer.step()  # type: ignore[attr-defined]
        scheduler.step()  # type: ignore[attr-defined]
        optimizer.zero_grad()  # type: ignore[attr-defined]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return _xla.to_cpu(dict(dl.unwrap(model).state_dict()))  # type: ignore[no-any-return]


def moments(optimizer: object) -> list[torch.Tensor]:
    state = optimizer.state_dict()["state"]  # type: ignore[attr-defined]
    return [_xla.to_cpu(state[i][k]) for i in sorted(state) for k in ("exp_avg", "exp_avg_sq")]


def same(a: torch.nn.Module, b: torch.nn.Module, opt_a: object, opt_b: object) -> None:
    for name, value in weights(a).items():
        torch.testing.assert_close(value, weights(b)[name], rtol=1e-5, atol=1e-6)
    for x, y in zip(moments(opt_a), moments(opt_b), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_state_saved_under_xla_loads_under_plain_cpu_and_back(tmp_path: pathlib.Path) -> None:
    model, opt, sched, loader = parts(ENV, seed=0)
    batches = iter(loader)
    train(model, opt, sched, batches, steps=2)  # mid-epoch: the loader's position matters
    saved = dl.save_state(tmp_path / "xla", ENV, model=model, optimizer=opt, scheduler=sched,
                          loader=loader, step=2)
    batches.close()

    cpu_model, cpu_opt, cpu_sched, cpu_loader = parts(CPU, seed=1)  # other weights
    assert dl.load_state(saved, CPU, model=cpu_model, optimizer=cpu_opt, scheduler=cpu_sched,
                         loader=cpu_loader) == {"step": 2}
    same(cpu_model, model, cpu_opt, opt)
    assert cpu_sched.get_last_lr() == sched.get_last_lr()  # type: ignore[attr-defined]
    # the epoch, and the batches left after the two the XLA run used
    assert (len(cpu_loader), cpu_loader.remaining) == (6, 6 - 2)

    # ... and back: the plain CPU run goes on one step, saves, and XLA resumes from that
    cpu_batches = iter(cpu_loader)
    train(cpu_model, cpu_opt, cpu_sched, cpu_batches, steps=1)
    saved = dl.save_state(tmp_path / "cpu", CPU, model=cpu_model, optimizer=cpu_opt,
                          scheduler=cpu_sched, loader=cpu_loader, step=3)
    xla_model, xla_opt, xla_sched, xla_loader = parts(ENV, seed=2)
    assert dl.load_state(saved, ENV, model=xla_model, optimizer=xla_opt, scheduler=xla_sched,
                         loader=xla_loader) == {"step": 3}
    same(xla_model, cpu_model, xla_opt, cpu_opt)
    state = xla_opt.state  # type: ignore[attr-defined]
    assert {t.device.type for s in state.values() for k, t in s.items() if k != "step"} == {"xla"}
    assert {p.device.type for p in xla_model.parameters()} == {"xla"}
    # one more step on each from the restored position: the same batches, the same result
    train(cpu_model, cpu_opt, cpu_sched, cpu_batches, steps=1)
    train(xla_model, xla_opt, xla_sched, iter(xla_loader), steps=1)
    same(xla_model, cpu_model, xla_opt, cpu_opt)


def test_dcp_reads_and_writes_cpu_tensors_under_xla(tmp_path: pathlib.Path,
                                                     monkeypatch: object) -> None:
    from torch.distributed.checkpoint import state_dict_loader, state_dict_saver

    seen: dict[str, set[str]] = {"save": set(), "load": set()}

    def spy(kind: str, real: object) -> object:
        def call(state: dict[str, object], **kwargs: object) -> object:
            seen[kind] |= {t.device.type for t in _leaves(state)}
            return real(state, **kwargs)  # type: ignore[operator]
        return call

    monkeypatch.setattr(state_dict_saver, "save", spy("save", state_dict_saver.save))  # type: ignore[attr-defined]
    monkeypatch.setattr(state_dict_loader, "load", spy("load", state_dict_loader.load))  # type: ignore[attr-defined]
    model, opt, sched, loader = parts(ENV, seed=0)
    train(model, opt, sched, loader, steps=1)
    dl.save_state(tmp_path / "c", ENV, model=model, optimizer=opt)
    dl.load_state(tmp_path / "c", ENV, model=model, optimizer=opt)
    assert seen == {"save": {"cpu"}, "load": {"cpu"}}
    assert {p.device.type for p in model.parameters()} == {"xla"}


def _leaves(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _leaves(v)]
    return []
