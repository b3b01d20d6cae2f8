"""The `Wrapped` protocol: a user's own strategy through wrap / backward / clip_grad_norm, and
each built-in Wrapped's full_state, self-saving and release (DeepSpeed in a 1-rank group)."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
import torch._dynamo  # its import sets TORCHINDUCTOR_CACHE_DIR; do it before the leak check

import distlib as dl
from distlib.errors import StrategyError
from distlib.training import MicroStep, Wrapped, attach, owner_of, wrapped_of
from distlib.training.memory import free_memory


class HalvingWrapped:
    """A Wrapped written from the protocol alone: backward halves the loss, clip records."""

    saves_itself = False

    def __init__(self, strategy: Any, env: dl.Env, module: torch.nn.Module,
                 optimizer: Any) -> None:
        self.strategy, self.env, self.module = strategy, env, module
        self.optimizer, self.scaler = optimizer, None
        self.calls: list[tuple[str, Any]] = []

    def backward(self, loss: torch.Tensor, micro: MicroStep | None) -> None:
        self.calls.append(("backward", micro))
        (loss * self.strategy.factor).backward()

    def clip_grad_norm(self, max_norm: float, norm_type: float) -> torch.Tensor | None:
        self.calls.append(("clip", (max_norm, norm_type)))
        return torch.tensor(-1.0)

    def full_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def save_checkpoint(self, folder: pathlib.Path) -> None:
        raise AssertionError("not a self-saving model")

    def load_checkpoint(self, folder: pathlib.Path) -> bool:
        raise AssertionError("not a self-saving model")

    def release(self) -> None:
        self.calls.append(("release", None))
        del self.module.__dict__["_distlib_handle"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Halving:
    """A user's own strategy value: a name, options, and its applier as a method."""

    name: ClassVar[str] = "halving"
    factor: float = 0.5

    def apply(self, model: torch.nn.Module, env: dl.Env, *, optimizer: Any = None,
              scheduler: Any = None) -> tuple[Any, Any, Any]:
        model.to(env.torch_device)
        return attach(model, HalvingWrapped(self, env, model, optimizer)), optimizer, scheduler


@dataclass(frozen=True, slots=True, kw_only=True)
class NoApplier:
    name: ClassVar[str] = "plain"


@dataclass(frozen=True, slots=True, kw_only=True)
class ForgetsToAttach:
    name: ClassVar[str] = "forgetful"

    def apply(self, model: torch.nn.Module, env: dl.Env, *, optimizer: Any = None,
              scheduler: Any = None) -> tuple[Any, Any, Any]:
        return model, optimizer, scheduler


def test_a_user_strategy_with_its_own_applier_runs_through_the_verbs() -> None:
    inner = torch.nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(inner.parameters(), lr=0.1)
    model, opt_out = dl.wrap(inner, Halving(factor=0.25), env=dl.Env(), optimizer=opt)
    assert model is inner and opt_out is opt
    wrapped = wrapped_of(model)
    assert isinstance(wrapped, HalvingWrapped) and isinstance(wrapped, Wrapped)
    assert dl.unwrap(model) is inner
    micro = MicroStep(step=0, index=1, size=2, sync=True)
    dl.backward(model(torch.ones(1, 2)).sum(), model, micro)  # / 2 by the verb, * 0.25 by it
    torch.testing.assert_close(inner.weight.grad, torch.full((1, 2), 0.125))
    assert dl.clip_grad_norm(model, 3.0) == -1.0
    assert wrapped.calls == [("backward", micro), ("clip", (3.0, 2.0))]
    assert free_memory(model) == [None]
    assert wrapped.calls[-1] == ("release", None) and wrapped_of(inner) is None


def test_a_strategy_value_without_an_applier_is_refused() -> None:
    with pytest.raises(StrategyError, match=r"wrap\(\): strategy 'plain' must have an apply "
                       r"function .* but got a NoApplier with neither"):
        dl.wrap(torch.nn.Linear(2, 2), NoApplier(), env=dl.Env())
    with pytest.raises(StrategyError, match=r"'forgetful''s apply must return \(model, "
                       r"optimizer, scheduler\) with a Wrapped attached"):
        dl.wrap(torch.nn.Linear(2, 2), ForgetsToAttach(), env=dl.Env())


def test_the_applier_table_is_read_only() -> None:
    from distlib.training import wrapping

    with pytest.raises(TypeError):
        wrapping._APPLIERS[NoApplier] = lambda *a, **k: None  # type: ignore[index]


def _expected_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_single_wrapped_full_state_owner_and_no_self_saving(tmp_path: pathlib.Path) -> None:
    inner = torch.nn.Linear(3, 2)
    plain_opt = torch.optim.SGD(inner.parameters(), lr=0.1)
    model, opt = dl.wrap(inner, dl.Env(precision="fp16"), optimizer=plain_opt)
    wrapped = wrapped_of(model)
    assert wrapped is not None and isinstance(wrapped, Wrapped)
    assert wrapped.module is inner and wrapped.optimizer is opt and not wrapped.saves_itself
    assert wrapped.scaler is opt.scaler and owner_of(opt) is wrapped
    assert owner_of(plain_opt) is None  # the user's own optimizer is no view
    state = wrapped.full_state()
    torch.testing.assert_close(state, _expected_state(inner))
    assert all(v.device.type == "cpu" for v in state.values())
    with pytest.raises(StrategyError, match="must save itself"):
        wrapped.save_checkpoint(tmp_path)
    with pytest.raises(StrategyError, match="must save itself"):
        wrapped.load_checkpoint(tmp_path)
    wrapped.release()
    assert wrapped_of(model) is None and "forward" not in vars(inner)
    wrapped.release()  # twice is harmless


def test_full_state_is_empty_off_the_main_rank() -> None:
    from distlib.training.single import SingleWrapped

    module = torch.nn.Linear(2, 2)
    off_main = SingleWrapped(strategy=dl.Single(), env=dl.Env(rank=1, world_size=2),
                             module=module)
    assert off_main.full_state() == {}


def test_ddp_and_fsdp_full_state_is_the_whole_module(group: None) -> None:
    for strategy in (dl.DDP(), dl.FSDP()):
        torch.manual_seed(0)
        inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        expected = _expected_state(inner)
        model = dl.wrap(inner, strategy, env=dl.Env())
        wrapped = wrapped_of(model)
        assert wrapped is not None and not wrapped.saves_itself
        state = wrapped.full_state()
        assert all(type(v) is torch.Tensor and v.device.type == "cpu" for v in state.values())
        torch.testing.assert_close(state, expected)


@pytest.mark.slow
def test_deepspeed_wrapped_saves_and_loads_itself(
        group: None, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")  # what a launcher sets; DeepSpeed reads it
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # deepspeed's import sets it
    import deepspeed.utils.groups

    # DeepSpeed keeps a clone of the first world group it saw; this test's group is a new one.
    monkeypatch.setattr(deepspeed.utils.groups, "_WORLD_GROUP", None)

    def build(seed: int) -> tuple[Any, Any]:
        torch.manual_seed(seed)
        inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        return dl.wrap(inner, dl.DeepSpeed(zero_stage=3), env=dl.Env(),
                       optimizer=torch.optim.SGD(inner.parameters(), lr=0.1))

    engine, opt = build(0)
    wrapped = wrapped_of(engine)
    assert wrapped is not None and wrapped.saves_itself and wrapped.scaler is None
    assert owner_of(opt) is wrapped and wrapped.optimizer is opt
    dl.backward(engine(torch.ones(2, 4)).sum(), engine)
    assert dl.clip_grad_norm(engine, 0.5) is None
    opt.step()
    state = wrapped.full_state()  # ZeRO-3 partitions gathered
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "0.weight": (4, 4), "0.bias": (4,), "1.weight": (2, 4), "1.bias": (2,)}
    wrapped.save_checkpoint(tmp_path / "ds")
    other_engine, _ = build(1)
    other = wrapped_of(other_engine)
    assert other is not None
    assert not torch.equal(other.full_state()["0.weight"], state["0.weight"])
    assert other.load_checkpoint(tmp_path / "ds")
    torch.testing.assert_close(other.full_state(), state)
    for each in (wrapped, other):
        each.release()
        assert each.engine is None  # type: ignore[attr-defined]
    assert wrapped_of(engine) is None and wrapped_of(other_engine) is None
