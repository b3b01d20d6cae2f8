"""The raw-torch baseline: the nlp example with DistributedSampler + DDP, run by torchrun.

    torchrun --nproc-per-node 2 benchmarks/peers/nlp_example_torch.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from transformers import get_linear_schedule_with_warmup

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "accelerate"))
from mrpc_like import accuracy_f1, add_arguments, collate_fn, make_split, tiny_bert


def main() -> None:
    parser = argparse.ArgumentParser(description="Simple example of training script.")
    add_arguments(parser)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(42)
    train, validation = make_split(args.train_size, seed=1), make_split(args.eval_size, seed=2)
    sampler = DistributedSampler(train, shuffle=True, seed=42)
    train_loader = DataLoader(train, sampler=sampler, collate_fn=collate_fn, batch_size=16)
    eval_loader = DataLoader(validation, sampler=DistributedSampler(validation, shuffle=False),
                             collate_fn=collate_fn, batch_size=32)
    model = DistributedDataParallel(tiny_bert())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, args.warmup,
                                                len(train_loader) * args.epochs)
    losses, metrics, start = [], [], time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        sampler.set_epoch(epoch)
        for batch in train_loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / world)
        model.eval()
        predictions, references = [], []
        for batch in eval_loader:
            with torch.no_grad():
                preds = model(**batch).logits.argmax(dim=-1)
            both = [torch.zeros_like(preds) for _ in range(world)]
            refs = [torch.zeros_like(preds) for _ in range(world)]
            dist.all_gather(both, preds)  # DistributedSampler pads: the last rows may repeat
            dist.all_gather(refs, batch["labels"])
            predictions += both
            references += refs
        metric = accuracy_f1(torch.cat(predictions), torch.cat(references))
        metrics.append(metric)
        if rank == 0:
            print(f"epoch {epoch}:", {k: round(v, 4) for k, v in metric.items()}, flush=True)
    if args.output and rank == 0:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"losses": losses, "metrics": metrics,
                       "seconds": time.perf_counter() - start,
                       "threads": torch.get_num_threads(), "world_size": world}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
