"""Train a tiny Llama (built from a transformers config) on a mesh: data x tensor parallel.

One process:                     python examples/tensor_parallel.py
FSDP2 x tensor parallel (2x2):   distlib launch --cpu --num-processes 4 --tp-size 2 examples/tensor_parallel.py
HSDP x tensor parallel (2x1x2):  distlib launch --cpu --num-processes 4 --tp-size 2 --dp-replicate-size 2 examples/tensor_parallel.py

Needs transformers (no download: the model is built from a config). The script is the same on
every mesh: `wrap` applies the Env's mesh (the model's own tensor-parallel plan on the tp axis,
FSDP2 over the data axes), `shard` deals batches by the data-parallel rank, and `reduce`
averages the loss over the data-parallel group. With ``split_batches`` each step sees the same
global batch on any mesh, so the printed losses match one process. The distlib lines are "# dl".
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import distlib as dl


def tokens(num: int, seq: int, vocab: int) -> torch.Tensor:
    """Sequences that count upwards from a random start (mod vocab): easy to learn."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, vocab, (num, 1), generator=g)
    return (start + torch.arange(seq)) % vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (split over dp)")
    args = parser.parse_args()

    env = dl.detect()  # dl: the mesh comes from --tp-size / --dp-*-size (DISTLIB_MESH)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = dl.wrap(model, env, optimizer=optimizer)  # dl
    data = torch.utils.data.TensorDataset(tokens(args.steps * args.batch_size, 16, 64))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    loader = dl.shard(loader, env, split_batches=True)  # dl: this dp rank's part of each batch
    losses = []
    for (ids,) in loader:
        loss = model(input_ids=ids, labels=ids).loss
        dl.backward(loss, model)  # dl
        dl.clip_grad_norm(model, 1.0)  # dl
        optimizer.step()
        optimizer.zero_grad()
        losses.append(dl.reduce(loss.detach(), env, op="mean").item())  # dl: over the dp group
    dl.main_print(env, f"mesh {env.mesh} ({env.strategy.name}, {env.world_size} process(es))")
    dl.main_print(env, "losses " + " ".join(f"{v:.6f}" for v in losses))
    dl.main_print(env, f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
