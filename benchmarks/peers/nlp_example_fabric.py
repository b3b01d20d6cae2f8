"""The Lightning Fabric peer: the nlp example as a Fabric user writes it.

    fabric run --accelerator cpu --devices 2 benchmarks/peers/nlp_example_fabric.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "accelerate"))
from mrpc_like import accuracy_f1, add_arguments, collate_fn, make_split, tiny_bert


def main() -> None:
    parser = argparse.ArgumentParser(description="Simple example of training script.")
    add_arguments(parser)
    args = parser.parse_args()
    fabric = Fabric()  # `fabric run` started the processes and passes devices and strategy
    fabric.seed_everything(42)
    train, validation = make_split(args.train_size, seed=1), make_split(args.eval_size, seed=2)
    train_loader = DataLoader(train, shuffle=True, collate_fn=collate_fn, batch_size=16)
    eval_loader = DataLoader(validation, shuffle=False, collate_fn=collate_fn, batch_size=32)
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = fabric.setup(model, optimizer)
    train_loader, eval_loader = fabric.setup_dataloaders(train_loader, eval_loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, args.warmup,
                                                len(train_loader) * args.epochs)
    losses, metrics, start = [], [], time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for batch in train_loader:
            loss = model(**batch).loss
            fabric.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(float(fabric.all_reduce(loss.detach(), reduce_op="mean")))
        model.eval()
        predictions, references = [], []
        for batch in eval_loader:
            with torch.no_grad():
                preds = model(**batch).logits.argmax(dim=-1)
            predictions.append(fabric.all_gather(preds).flatten())  # padded rows repeat
            references.append(fabric.all_gather(batch["labels"]).flatten())
        metric = accuracy_f1(torch.cat(predictions), torch.cat(references))
        metrics.append(metric)
        fabric.print(f"epoch {epoch}:", {k: round(v, 4) for k, v in metric.items()})
    if args.output and fabric.global_rank == 0:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"losses": losses, "metrics": metrics,
                       "seconds": time.perf_counter() - start,
                       "threads": torch.get_num_threads(), "world_size": fabric.world_size},
                      handle)


if __name__ == "__main__":
    main()
