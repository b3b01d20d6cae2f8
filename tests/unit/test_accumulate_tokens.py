"""accumulate(count=...) and backward over tokens, in one process: MicroStep.num_items is the
window's valid-token count, and the accumulated gradient is the token mean of one big batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch._dynamo  # its import sets TORCHINDUCTOR_CACHE_DIR; do it before the leak check
from torch.nn import functional as F

import distlib as dl
from distlib.errors import ConfigError
from distlib.training.accumulation import MicroStep
from tests.batches import padded_token_batches, token_loss

VOCAB, T = 11, 6


class _NoLen:
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.items)


@pytest.mark.parametrize("n", range(0, 10))
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("sized", [True, False])
def test_counted_windows_match_the_plain_ones_and_sum_their_counts(n: int, steps: int,
                                                                   sized: bool) -> None:
    items = [i + 1 for i in range(n)]  # batch i counts i + 1 items
    loader = items if sized else _NoLen(items)
    plain = list(dl.accumulate(items, steps=steps))  # sized: the exact windows
    counted = list(dl.accumulate(loader, steps, count=lambda b: b, env=dl.Env()))
    assert [b for b, _ in counted] == items
    for (_, p), (_, c) in zip(plain, counted, strict=True):
        assert (c.step, c.index, c.size, c.sync, c.next_sync) == (
            p.step, p.index, p.size, p.sync, p.next_sync)
        window = items[c.step * steps:(c.step + 1) * steps]
        assert c.num_items == sum(window)
    assert all(m.num_items is None for _, m in plain)


def test_counts_may_be_integer_tensors_and_the_env_comes_from_the_loader() -> None:
    labels = [torch.tensor([[1, -100, 2]]), torch.tensor([[-100, -100, 3]])]

    class Loader(list):  # type: ignore[type-arg]
        env = dl.Env()

    out = list(dl.accumulate(Loader(labels), 2, count=lambda b: (b != -100).sum()))
    assert [m.num_items for _, m in out] == [3, 3]
    out = list(dl.accumulate(labels, 1, count=lambda b: (b != -100).sum(dim=1), env=dl.Env()))
    assert [m.num_items for _, m in out] == [2, 1]
    np = pytest.importorskip("numpy")
    out = list(dl.accumulate(labels, 2, count=lambda b: np.int64((b != -100).sum()),
                             env=dl.Env()))
    assert [m.num_items for _, m in out] == [3, 3]


@pytest.mark.parametrize("value", [2.5, "3", None, -1, True, [1, 2], torch.tensor(2.0),
                                   torch.tensor([1, 2]), torch.tensor([[1.0]]),
                                   torch.tensor(1 + 2j)])
def test_count_that_is_not_a_count_is_refused_with_the_value(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"accumulate\(\): count\(batch\) must return an int "
                       r">= 0 or a one-element integer tensor, but got .* for batch 1 of window "
                       r"0\. Return the batch's valid items, e\.g\. count=lambda b"):
        list(dl.accumulate(["a", "b"], 2, count=lambda b: 1 if b == "a" else value,
                           env=dl.Env()))


def test_a_negative_tensor_count_is_refused_after_the_sum() -> None:
    with pytest.raises(ConfigError, match=r"counts of window 0 sum to -3"):
        list(dl.accumulate(["a"], 1, count=lambda b: torch.tensor(-3), env=dl.Env()))


@pytest.mark.parametrize("count", [3, "len", object()])
def test_count_must_be_callable_and_is_checked_at_the_call(count: Any) -> None:
    with pytest.raises(ConfigError, match=r"accumulate\(\): count must be a function "
                       r"count\(batch\) -> int, but got"):
        dl.accumulate([1], 1, count=count, env=dl.Env())  # no iteration: refused eagerly
    with pytest.raises(ConfigError, match="steps must be an int >= 1"):
        dl.accumulate([1], 0)


@pytest.mark.parametrize("value", [-1, 1.0, True])
def test_microstep_num_items_must_be_an_int(value: Any) -> None:
    with pytest.raises(ConfigError, match="num_items must be an int >= 0"):
        MicroStep(step=0, index=0, size=1, sync=True, num_items=value)


def _lm() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, VOCAB))


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("wrapped", [False, True])
def test_token_weighted_accumulation_equals_one_big_batch(wrapped: bool) -> None:
    # Three micro-batches with 1, 11 and 4 valid tokens: the mean of per-batch means is not
    # the token mean; the counted window is.
    batches = padded_token_batches([[1, 0], [6, 5], [2, 2]], vocab=VOCAB, tokens=T)
    model = _lm()
    model = dl.wrap(model, dl.Env()) if wrapped else model
    for batch, micro in dl.accumulate(batches, 3, count=lambda b: (b["labels"] != -100).sum(),
                                      env=dl.Env()):
        assert micro.num_items == 16
        dl.backward(token_loss(model, batch, "sum"), model, micro)
    got = _grads(model)

    reference = _lm()
    whole = {k: torch.cat([b[k] for b in batches]) for k in ("ids", "labels")}
    logits = reference(whole["ids"])
    F.cross_entropy(logits.flatten(0, 1), whole["labels"].flatten(),
                    ignore_index=-100).backward()  # the token mean of one big batch
    for g, r in zip(got, _grads(reference), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)

    per_batch_means = _lm()  # and the uncounted loop really differs (the bug being fixed)
    for batch, micro in dl.accumulate(batches, 3):
        logits = per_batch_means(batch["ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                               ignore_index=-100)
        dl.backward(torch.nan_to_num(loss), per_batch_means, micro)
    assert not torch.allclose(_grads(per_batch_means)[-1], _grads(reference)[-1], atol=1e-3)


@pytest.mark.parametrize("make", [
    lambda logits, labels: F.cross_entropy(logits, labels, ignore_index=-100),
    lambda logits, labels: F.cross_entropy(logits, labels, reduction="none").mean(),
    lambda logits, labels: F.cross_entropy(logits, labels, reduction="sum") / 7,
    lambda logits, labels: F.cross_entropy(logits, labels, reduction="sum").div(7),
])
def test_backward_refuses_a_mean_when_it_divides_by_num_items(make: Any) -> None:
    model = _lm()
    batch = padded_token_batches([[3]], vocab=VOCAB, tokens=T)[0]
    micro = MicroStep(step=0, index=0, size=1, sync=True, num_items=3)
    logits = model(batch["ids"]).flatten(0, 1)
    labels = batch["labels"].flatten().clamp(min=0)
    with pytest.raises(ConfigError, match=r"backward\(\): loss must be summed over the batch's "
                       r"items when micro.num_items is set .* but got a loss made by \w+( with reduction=.mean.)? "
                       r"\(a mean or a division\)\. backward divides by micro.num_items"):
        dl.backward(make(logits, labels), model, micro)
    assert all(p.grad is None for p in model.parameters())  # refused before any gradient


def test_a_window_without_tokens_gives_zero_gradients_not_nan() -> None:
    model = _lm()
    (batch, micro), = dl.accumulate(padded_token_batches([[0, 0]], vocab=VOCAB, tokens=T), 1,
                                    count=lambda b: (b["labels"] != -100).sum(), env=dl.Env())
    assert micro.num_items == 0
    dl.backward(token_loss(model, batch, "sum"), model, micro)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in _grads(model))
