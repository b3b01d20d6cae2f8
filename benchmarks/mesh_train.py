"""Training steps per second on a 2-D mesh: (dp_shard 2 x tp 2) vs (dp_shard 4), as a ratio.

4 gloo ranks on this machine (started with distlib's launcher), one torch thread each, the
tiny Llama of tests/multiprocess/test_mesh_train.py (vocab 64, hidden 32, 2 layers, 4
attention heads, 2 kv heads; a two-Linear MLP with a hand-written plan when transformers is
missing), a global batch of 8 sequences of 32 tokens, SGD with clipping: the contract loop
(`dl.wrap` under the mesh, `dl.backward`, `dl.clip_grad_norm`). Each measurement warms up a
few steps, then times the rest; the meshes alternate over several rounds (so load from
elsewhere on a shared machine hits both alike) and rank 0 keeps each one's median. On a CPU
tensor parallelism only adds collectives to so small a model: the ratio says what the tp axis
costs here, not what it saves on GPUs.

Run: python benchmarks/mesh_train.py [--steps 20] [--warmup 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

MESHES = {"dp_shard 2 x tp 2": {"dp_shard": 2, "tp": 2}, "dp_shard 4": {"dp_shard": 4}}
BATCH, SEQ, VOCAB = 8, 32, 64
MLP_PLAN = {"up": "colwise", "down": "rowwise"}


def _model() -> tuple[str, Any]:
    import torch

    torch.manual_seed(0)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        class MLP(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = torch.nn.Embedding(VOCAB, 32)
                self.up = torch.nn.Linear(32, 64)
                self.down = torch.nn.Linear(64, 32)
                self.head = torch.nn.Linear(32, VOCAB)

            def forward(self, ids: Any) -> Any:
                return self.head(self.down(torch.relu(self.up(self.embed(ids)))))
        return "mlp", MLP()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return "llama", LlamaForCausalLM(config)


def _rate(env: Any, sizes: dict[str, int], batches: list[Any], warmup: int) -> float:
    """Steps per second of the contract loop under ``sizes``, all ranks timed together."""
    import dataclasses

    import torch
    import torch.distributed as dist

    import distlib as dl

    env = dataclasses.replace(env, mesh=dl.Mesh(**sizes), strategy=dl.FSDP())
    kind, model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = ("auto" if kind == "llama" else MLP_PLAN) if env.mesh.tp > 1 else "auto"
    model, optimizer = dl.wrap(model, env, optimizer=optimizer, tp_plan=plan)
    rows = BATCH // env.mesh.dp_size
    start = rows * env.mesh.dp_rank(env.rank)

    def step(ids: Any) -> None:
        ids = ids[start:start + rows]
        if kind == "llama":
            loss = model(input_ids=ids, labels=ids).loss
        else:
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                     ids[:, 1:].reshape(-1))
        dl.backward(loss, model)
        dl.clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    for ids in batches[:warmup]:
        step(ids)
    dist.barrier()
    begin = time.perf_counter()
    for ids in batches[warmup:]:
        step(ids)
    dist.barrier()
    return (len(batches) - warmup) / (time.perf_counter() - begin)


def _bench(steps: int, warmup: int, rounds: int) -> dict[str, Any]:
    import torch

    import distlib as dl
    from distlib.runtime import initialize, shutdown

    torch.set_num_threads(1)
    env = dl.detect(cpu=True)
    initialize(env)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(warmup + steps)]
    names = list(MESHES)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % 2:] + names[:r % 2]:  # alternate which mesh goes first
            rates[name].append(_rate(env, MESHES[name], batches, warmup))
    shutdown()
    return {"model": _model()[0], **{name: statistics.median(v) for name, v in rates.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import distlib as dl

    result = dl.launch(_bench, args.steps, args.warmup, args.rounds, num_processes=4, cpu=True,
                       timeout_s=1800)
    rates = result[0]
    print(f"4 gloo ranks, tiny {rates.pop('model')} (vocab {VOCAB}), global batch {BATCH} x "
          f"{SEQ} tokens, {args.warmup} warm-up + {args.steps} timed steps, median of "
          f"{args.rounds} rounds, rank 0")
    base = rates["dp_shard 4"]
    print(f"{'mesh':<20} {'steps/s':>9} {'vs dp_shard 4':>14}")
    for name, rate in rates.items():
        print(f"{name:<20} {rate:9.2f} {rate / base:13.3f}x")


if __name__ == "__main__":
    main()
