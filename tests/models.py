"""The small models the tests train, the loops that train them, and a stream to shard.

One definition of each, shared by the unit, multiprocess, fault and GPU tests; each test keeps
its own numbers (widths, seeds, learning rates, clipping) by passing them. Imported as
``tests.models`` (the repository root is on ``sys.path`` under pytest, and the launcher hands
``sys.path`` to the ranks it starts, so functions that ranks run may use it too).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import IterableDataset

import distlib as dl

__all__ = ["Block", "Stream", "causal_lm_loss", "clipped_losses", "net", "tiny_llama", "train",
           "train_steps", "weights"]


class Block(torch.nn.Module):
    """A linear layer and a tanh: the unit FSDP tests wrap by class name (``"Block"``)."""

    def __init__(self, width_in: int, width_out: int | None = None) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(width_in, width_in if width_out is None else width_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


_ACTIVATIONS: dict[str, type[torch.nn.Module]] = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}


def net(*widths: int, seed: int | None = 0,
        hidden: Literal["block", "tanh", "relu", "linear"] = "block") -> torch.nn.Sequential:
    """A ``Sequential`` through ``widths`` (at least two), seeded with ``seed`` first.

    Each hidden step is a `Block` (``hidden="block"``), a ``Linear`` followed by a ``Tanh`` or
    ``ReLU``, or a bare ``Linear`` (``"linear"``); the last step is always a bare ``Linear``.
    ``seed=None`` leaves the global RNG alone (the weights follow from its state).

    Example: ``net(8, 16, 16, 2)`` is ``Sequential(Block(8, 16), Block(16, 16), Linear(16, 2))``.
    """
    if len(widths) < 2:
        msg = f"net(): widths must hold at least two sizes, but got {widths!r}."
        raise ValueError(msg)
    if seed is not None:
        torch.manual_seed(seed)
    pairs = list(itertools.pairwise(widths))
    layers: list[torch.nn.Module] = []
    for width_in, width_out in pairs[:-1]:
        if hidden == "block":
            layers.append(Block(width_in, width_out))
            continue
        layers.append(torch.nn.Linear(width_in, width_out))
        if hidden != "linear":
            layers.append(_ACTIVATIONS[hidden]())
    layers.append(torch.nn.Linear(*pairs[-1]))
    return torch.nn.Sequential(*layers)


def tiny_llama(*, vocab: int = 64, kv_heads: int = 2, seed: int = 0) -> torch.nn.Module:
    """The tiny transformers Llama that the mesh tests train, seeded with ``seed`` first.

    2 layers, hidden size 32, 4 attention heads and ``kv_heads`` key-value heads: 2 allow tp 2
    at most, 4 allow tp 4.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads)
    return LlamaForCausalLM(config)


def causal_lm_loss(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """A transformers causal LM's own loss of predicting ``ids`` from ``ids``."""
    return model(input_ids=ids, labels=ids).loss  # type: ignore[no-any-return]


def clipped_losses(model: Any, optimizer: Any, batches: Iterable[torch.Tensor],
                   loss_of: Callable[[Any, torch.Tensor], torch.Tensor], *, max_norm: float,
                   env: dl.Env | None = None) -> list[float]:
    """One step per global batch of ids: the loss, backward, clipping to ``max_norm``, the
    optimizer's step and ``zero_grad``; each step's loss.

    With ``env=None`` one process takes the whole batch through plain autograd and torch's
    clipping (the reference). With an Env, this rank takes its data-parallel rows of each batch
    (the ranks of a tp group take the same rows) through ``dl.backward`` and
    ``dl.clip_grad_norm``: the mean of the ranks' losses is the global batch's loss.
    """
    losses = []
    for ids in batches:
        if env is None:
            loss = loss_of(model, ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        else:
            per = ids.shape[0] // env.mesh.dp_size
            dp_rank = env.mesh.dp_rank(env.rank)
            loss = loss_of(model, ids[dp_rank * per:(dp_rank + 1) * per])
            dl.backward(loss, model)
            dl.clip_grad_norm(model, max_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.item()))
    return losses


def shuffled_loader(env: Any, *, samples: int = 64, features: int = 6, outputs: int = 2,
                    batch_size: int = 4) -> Any:
    """The checkpoint tests' data: seeded random pairs in a shuffled loader, sharded for ``env``.

    The same samples and the same shuffle in every process (seeds 3 and 11).
    """
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(samples, features, generator=g),
                                          torch.randn(samples, outputs, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(11))
    return dl.shard(loader, env)


def weights(model: Any) -> dict[str, torch.Tensor]:
    """The full weights of a wrapped (or plain) model: float32 copies on the CPU, by name.

    FSDP2's DTensors are gathered with ``full_tensor``, DeepSpeed ZeRO-3's partitions with
    ``GatheredParameters`` (every rank must call this then).
    """
    inner = dl.unwrap(model)
    params = list(inner.parameters())
    if params and hasattr(params[0], "ds_id"):  # DeepSpeed ZeRO-3: gather the partitions first
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().float().cpu().clone() for k, v in inner.state_dict().items()}
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().cpu().clone()
            for k, v in inner.state_dict().items()}


def train(models: Sequence[tuple[Any, ...]], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
          *, steps: int = 1, clip: float | None = None, overflow: bool = False,
          device: str | None = None, out_dtype: torch.dtype | None = None) -> None:
    """Train each ``(model, optimizer[, scheduler])`` side by side on ``batches`` (MSE loss).

    The loop of DESIGN.md: ``dl.accumulate`` windows of ``steps`` batches, ``dl.backward`` with
    the micro-step; at each window's end ``dl.clip_grad_norm`` (when ``clip`` is given), the
    optimizer's and the scheduler's step, ``zero_grad``. The models take turns on each batch,
    so wrapped models that live side by side are exercised together.

    Args:
        models: ``(model, optimizer)`` or ``(model, optimizer, scheduler)`` tuples.
        batches: ``(x, y)`` pairs.
        steps: micro-steps per window.
        clip: the gradient norm to clip to, or None to not clip.
        overflow: multiply the first window's losses by 1e30 (an fp16 overflow).
        device: move each batch there first (None: leave it where it is).
        out_dtype: when given, every forward's output must have this dtype.
    """
    for (x, y), micro in dl.accumulate(batches, steps=steps):
        if device is not None:
            x, y = x.to(device), y.to(device)
        for model, optimizer, *scheduler in models:
            out = model(x)
            if out_dtype is not None:
                assert out.dtype == out_dtype
            loss = torch.nn.functional.mse_loss(out, y)
            if overflow and micro.step == 0:
                loss = loss * 1e30
            dl.backward(loss, model, micro)
            if micro.sync:
                if clip is not None:
                    dl.clip_grad_norm(model, clip)
                optimizer.step()
                for each in scheduler:
                    each.step()
                optimizer.zero_grad()


def train_steps(model: Any, optimizer: Any, loader: Iterable[Any], steps: int, *,
                scheduler: Any = None,
                noise_on: Literal["outputs", "loss"] = "outputs") -> list[float]:
    """Train ``steps`` batches of ``loader`` (stopping mid-epoch); return each batch's ``x[0, 0]``.

    Each step draws one normal number from the global torch RNG, 1e-3 of it added to the
    model's outputs or to the loss (``noise_on``), so a resume must restore the RNG to repeat it.
    """
    seen: list[float] = []
    for x, y in loader:
        noise = torch.randn(1).item() * 1e-3
        out = model(x)
        loss = (torch.nn.functional.mse_loss(out + noise, y) if noise_on == "outputs"
                else torch.nn.functional.mse_loss(out, y) + noise)
        dl.backward(loss, model)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()
        seen.append(float(x[0, 0]))
        if len(seen) == steps:
            break
    return seen


class Stream(IterableDataset[int]):
    """The integers below ``n`` as an iterable dataset, with a length or (``sized=False``) none."""

    def __init__(self, n: int, sized: bool = True) -> None:
        self.n, self.sized = n, sized

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))

    def __len__(self) -> int:
        if not self.sized:
            raise TypeError("no length")
        return self.n
