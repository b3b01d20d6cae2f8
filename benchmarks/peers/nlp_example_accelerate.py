"""The peer: Accelerate's ``examples/nlp_example.py`` as its users run it, on the same offline
data and tiny BERT as distlib's port (``examples/accelerate/nlp_example.py``).

    accelerate launch --cpu --num_processes 2 benchmarks/peers/nlp_example_accelerate.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup, set_seed

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "accelerate"))
from mrpc_like import accuracy_f1, add_arguments, collate_fn, make_split, tiny_bert

MAX_GPU_BATCH_SIZE = 16
EVAL_BATCH_SIZE = 32


def training_function(config: dict[str, float], args: argparse.Namespace) -> None:
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    lr, num_epochs = config["lr"], int(config["num_epochs"])
    seed, batch_size = int(config["seed"]), int(config["batch_size"])
    train, validation = make_split(args.train_size, seed=1), make_split(args.eval_size, seed=2)
    gradient_accumulation_steps = 1
    set_seed(seed)
    train_dataloader = DataLoader(train, shuffle=True, collate_fn=collate_fn,
                                  batch_size=batch_size)
    eval_dataloader = DataLoader(validation, shuffle=False, collate_fn=collate_fn,
                                 batch_size=EVAL_BATCH_SIZE)
    model = tiny_bert()
    optimizer = torch.optim.AdamW(params=model.parameters(), lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer, num_warmup_steps=args.warmup,
        num_training_steps=(len(train_dataloader) * num_epochs) // gradient_accumulation_steps)
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)
    losses, metrics, start = [], [], time.perf_counter()
    for epoch in range(num_epochs):
        model.train()
        for batch in train_dataloader:
            outputs = model(**batch)
            loss = outputs.loss
            accelerator.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            losses.append(float(accelerator.gather(loss.detach()).mean()))
        model.eval()
        predictions, references = [], []
        for batch in eval_dataloader:
            with torch.no_grad():
                outputs = model(**batch)
            preds, refs = accelerator.gather_for_metrics(
                (outputs.logits.argmax(dim=-1), batch["labels"]))
            predictions.append(preds)
            references.append(refs)
        metric = accuracy_f1(torch.cat(predictions), torch.cat(references))
        metrics.append(metric)
        accelerator.print(f"epoch {epoch}:", {k: round(v, 4) for k, v in metric.items()})
    if args.output and accelerator.is_main_process:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"losses": losses, "metrics": metrics,
                       "seconds": time.perf_counter() - start,
                       "threads": torch.get_num_threads(),
                       "world_size": accelerator.num_processes}, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description="Simple example of training script.")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16", "fp8"], default=None)
    parser.add_argument("--cpu", action="store_true")
    add_arguments(parser)
    args = parser.parse_args()
    training_function({"lr": 1e-3, "num_epochs": args.epochs, "seed": 42, "batch_size": 16}, args)


if __name__ == "__main__":
    main()
