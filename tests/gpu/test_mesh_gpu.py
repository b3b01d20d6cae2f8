"""Context parallelism on CUDA (torch's ring attention has no CPU kernels): cp 2 trains like one process.

Skipped without CUDA; the two-rank test needs two GPUs (NCCL cannot put two ranks on one).
Tensor parallelism and FSDP/HSDP on a mesh are tested on CPU ranks in
``tests/multiprocess/test_mesh_train.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.testing import spawn
from distlib.topology import Mesh
from distlib.training.cp import check_cp

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS, BATCH, SEQ, VOCAB, LR = 4, 2, 16, 64, 0.5


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def _loss(model: Any, ids: torch.Tensor, labels: torch.Tensor,
          positions: torch.Tensor) -> torch.Tensor:
    # Labels are shifted beforehand: a cp rank holds chunks of the sequence, not its ends.
    logits = model(input_ids=ids, position_ids=positions).logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def _one_process() -> list[float]:
    model = _llama().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for batch in _batches():
        ids, labels = batch[:, :-1].cuda(), batch[:, 1:].cuda()
        positions = torch.arange(SEQ, device="cuda").expand(BATCH, SEQ)
        loss = _loss(model, ids, labels, positions)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _cp_rank(env: dl.Env) -> list[float]:
    env = dataclasses.replace(env, mesh=Mesh(dp_shard=1, cp=2), strategy=dl.FSDP())
    model = _llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = dl.wrap(model, env, optimizer=optimizer)
    losses = []
    for batch in _batches():  # every cp rank holds the whole batch; cp splits the sequence
        ids, labels = batch[:, :-1].to(env.torch_device), batch[:, 1:].to(env.torch_device)
        positions = torch.arange(SEQ, device=env.torch_device).expand(BATCH, SEQ).contiguous()
        with dl.training.context_parallel(env, [ids, labels, positions], [1, 1, 1]):
            loss = _loss(model, ids, labels, positions)
            dl.backward(loss, model)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_context_parallel_is_allowed_on_cuda() -> None:
    env = dl.Env(world_size=2, rank=0, local_world_size=2, device="cuda:0", backend="nccl",
                 mesh=Mesh(dp_shard=1, cp=2))
    check_cp(env)  # no error: CUDA has the ring-attention kernels


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cp2_trains_like_one_process() -> None:
    ranks = spawn(_cp_rank, world_size=2, cpu=False, timeout_s=300).returns
    # Each rank's loss is the mean over its half of the tokens (equal halves): their mean is
    # the loss of the whole batch.
    got = torch.tensor([ranks[0], ranks[1]]).mean(dim=0)
    torch.testing.assert_close(got, torch.tensor(_one_process()), rtol=1e-4, atol=0)
