"""accumulate / backward / clip_grad_norm / seed in one process (Single strategy)."""

from __future__ import annotations

import random

import pytest
import torch
import torch._dynamo  # its import sets TORCHINDUCTOR_CACHE_DIR; do it before the leak check

import distlib as dl
from distlib.errors import StrategyError
from distlib.testing import fake_env
from distlib.training.accumulation import MicroStep, plan_window
from tests.models import net, train


class _NoLen:
    def __init__(self, items: list[int]) -> None:
        self.items = items

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.items)


@pytest.mark.parametrize("n", range(0, 12))
@pytest.mark.parametrize("steps", [1, 2, 3, 5])
@pytest.mark.parametrize("sized", [True, False])
def test_accumulate_marks_window_ends_and_last_batch(n: int, steps: int, sized: bool) -> None:
    loader = list(range(n)) if sized else _NoLen(list(range(n)))
    out = list(dl.accumulate(loader, steps=steps))
    assert [b for b, _ in out] == list(range(n))
    syncs = [m.sync for _, m in out]
    expected = [(i + 1) % steps == 0 or i == n - 1 for i in range(n)]
    assert syncs == expected
    # next_sync predicts the following batch's sync; the last batch says True.
    assert [m.next_sync for _, m in out] == [*syncs[1:], True][:n]
    for i, (_, m) in enumerate(out):
        assert (m.step, m.index) == divmod(i, steps)
        if sized:  # the last window divides by what it really holds
            assert m.size == min(steps, n - m.step * steps)
        else:
            assert m.size == steps


def test_plan_window_partial_last_window() -> None:
    assert plan_window(4, 4, 6) == (1, 0, 2)
    assert plan_window(5, 4, None) == (1, 1, 4)


def test_accumulate_rejects_bad_steps() -> None:
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        list(dl.accumulate([1], steps=0))
    with pytest.raises(ValueError, match="index must be in"):
        MicroStep(step=0, index=2, size=2, sync=True)


def _mlp() -> torch.nn.Module:
    return net(4, 8, 2, hidden="tanh")


def _run(precision: str, steps: int, batch: int, clip: float | None = None) -> list[torch.Tensor]:
    """Train `_mlp` on 24 rows in batches of ``batch`` (SGD); return its parameters."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = dl.wrap(model, dl.Env(precision=precision), optimizer=opt)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 4, generator=g), torch.randn(24, 2, generator=g)
    loader = [(x[i:i + batch], y[i:i + batch]) for i in range(0, 24, batch)]
    train([(model, opt)], loader, steps=steps, clip=clip)
    return [p.detach().clone() for p in dl.unwrap(model).parameters()]


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_two_half_batches_equal_one_full_batch(precision: str) -> None:
    full = _run(precision, steps=1, batch=8)
    halves = _run(precision, steps=2, batch=4)
    tol = 1e-6 if precision == "no" else 5e-5  # fp16 rounds the two forwards differently
    for a, b in zip(full, halves, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=tol)


def test_partial_last_window_is_averaged() -> None:
    # 24 rows: batches of 8 -> 3 batches; steps=2 -> windows of 2 and 1 batches.
    got = _run("no", steps=2, batch=8)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 4, generator=g), torch.randn(24, 2, generator=g)
    for lo, hi in ((0, 16), (16, 24)):
        torch.nn.functional.mse_loss(model(x[lo:hi]), y[lo:hi]).backward()
        opt.step()
        opt.zero_grad()
    for a, b in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_fp16_with_scaler_matches_fp32_closely_and_clip_unscales_first() -> None:
    a = _run("no", steps=2, batch=4, clip=0.05)
    b = _run("fp16", steps=2, batch=4, clip=0.05)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0.02, atol=2e-3)


def test_clip_grad_norm_returns_norm_and_clips() -> None:
    model = dl.wrap(torch.nn.Linear(3, 1, bias=False), dl.Env())
    dl.backward(model(torch.full((1, 3), 2.0)).sum(), model)
    norm = dl.clip_grad_norm(model, 1.0)
    torch.testing.assert_close(norm, torch.tensor(12.0**0.5))
    torch.testing.assert_close(model.weight.grad.norm(), torch.tensor(1.0))


def test_backward_on_a_plain_module_divides_by_window() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    micro = MicroStep(step=0, index=0, size=4, sync=False)
    dl.backward(model(torch.ones(1, 1)).sum(), model, micro)
    torch.testing.assert_close(model.weight.grad, torch.tensor([[0.25]]))


def test_seed_is_reproducible_and_rank_specific() -> None:
    env = fake_env(2, 4)
    assert dl.seed(7, env) == 7
    first = (random.random(), torch.rand(1).item())
    dl.seed(7, env)
    assert (random.random(), torch.rand(1).item()) == first
    assert dl.seed(7, env, device_specific=True) == 9
    assert torch.rand(1).item() != first[1]
    with pytest.raises(TypeError, match="seed must be an int"):
        dl.seed("7", env)  # type: ignore[arg-type]


def test_fp16_backward_needs_the_optimizer_in_wrap() -> None:
    model = dl.wrap(torch.nn.Linear(2, 1), dl.Env(precision="fp16"))
    with pytest.raises(StrategyError, match="optimizer must be passed to wrap"):
        dl.backward(model(torch.ones(1, 2)).sum(), model)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_self_test_training_check_passes_in_one_process(precision: str) -> None:
    from distlib.cli._checks import check_training

    assert "4 steps match 1 process" in check_training(dl.Env(precision=precision))


def test_self_test_mesh_check_says_a_data_parallel_mesh_is_the_training_checks() -> None:
    from distlib.cli._checks import check_mesh

    detail = check_mesh(dl.Env(world_size=4, rank=1, local_world_size=4, local_rank=1))
    assert detail == ("skipped: no tp/cp axis (mesh dp_shard=4; training covers data "
                      "parallelism)")


@pytest.mark.parametrize(("sizes", "strategy", "reason"), [
    ({"dp_shard": 2, "cp": 2}, "fsdp", "context parallelism (cp > 1) must run on CUDA"),
    ({"dp_shard": 2, "tp": 2}, "ddp", "'ddp' must run on a data-parallel mesh"),
])
def test_self_test_mesh_check_fails_with_wraps_refusal_naming_the_mesh(
        sizes: dict[str, int], strategy: str, reason: str) -> None:
    from distlib.cli._checks import check_mesh
    from distlib.topology import Mesh

    # wrap refuses before it joins a group: one process can see the refusal of rank 0 of 4.
    env = dl.Env(world_size=4, rank=0, local_world_size=4, mesh=Mesh(**sizes),
                 strategy=strategy)
    with pytest.raises(StrategyError) as caught:
        check_mesh(env)
    message = str(caught.value)
    assert message.startswith(f"distlib test mesh: wrap must accept the mesh {env.mesh} under "
                              f"strategy {strategy!r} on cpu, but it refused: wrap(): ")
    assert reason in message


def test_self_test_mesh_models_split_under_their_tp_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from distlib.cli._checks import _tiny_model
    from distlib.training.tp import plan_tensor_parallel

    pytest.importorskip("transformers")
    name, llama, plan, vocab = _tiny_model(4)
    assert (name, plan, vocab) == ("llama", "auto", 128)
    assert (llama.config.num_attention_heads, llama.config.num_key_value_heads) == (8, 4)
    assert "model.layers.0.self_attn.q_proj" in plan_tensor_parallel(llama, plan, 4)
    monkeypatch.setitem(sys.modules, "transformers", None)  # a test extra, not a dependency
    name, mlp, plan, vocab = _tiny_model(4)
    assert (name, plan, vocab) == ("mlp", {"up": "colwise", "down": "rowwise"}, 128)
    assert sorted(plan_tensor_parallel(mlp, plan, 4)) == ["down", "up"]
    assert mlp(torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, 128)
