"""Accelerate's ``examples/nlp_example.py`` ported to distlib, line for line where it can be.

Fine-tunes a (tiny, offline) BERT on MRPC-like sentence pairs and reports accuracy and F1
after each epoch, exactly over the evaluation set (`dl.gather_metrics` drops the padding
that evens out the last batch). Run it as Accelerate's would be:

    distlib launch --cpu --num-processes 2 examples/accelerate/nlp_example.py
    python examples/accelerate/nlp_example.py --cpu          # one process

The distlib lines are marked "# dl"; Accelerate's calls they replace are in the comments.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from mrpc_like import accuracy_f1, add_arguments, collate_fn, make_split, tiny_bert
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

import distlib as dl

MAX_GPU_BATCH_SIZE = 16
EVAL_BATCH_SIZE = 32


def training_function(config: dict[str, float], args: argparse.Namespace) -> dict[str, object]:
    env = dl.detect(cpu=args.cpu, precision=args.mixed_precision)  # dl  Accelerator(cpu=, mixed_precision=)
    lr, num_epochs = config["lr"], int(config["num_epochs"])
    seed, batch_size = int(config["seed"]), int(config["batch_size"])
    train, validation = make_split(args.train_size, seed=1), make_split(args.eval_size, seed=2)

    gradient_accumulation_steps = 1
    if batch_size > MAX_GPU_BATCH_SIZE and env.device != "cpu":
        gradient_accumulation_steps = batch_size // MAX_GPU_BATCH_SIZE
        batch_size = MAX_GPU_BATCH_SIZE

    dl.seed(seed, env)                                                   # dl  set_seed(seed)
    train_dataloader = dl.shard(DataLoader(                              # dl  accelerator.prepare
        train, shuffle=True, collate_fn=collate_fn, batch_size=batch_size), env)
    eval_dataloader = dl.shard(DataLoader(                               # dl
        validation, shuffle=False, collate_fn=collate_fn, batch_size=EVAL_BATCH_SIZE), env)
    model = tiny_bert()
    optimizer = torch.optim.AdamW(params=model.parameters(), lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer, num_warmup_steps=args.warmup,
        num_training_steps=(len(train_dataloader) * num_epochs) // gradient_accumulation_steps)
    model, optimizer, lr_scheduler = dl.wrap(                           # dl  accelerator.prepare
        model, env, optimizer=optimizer, scheduler=lr_scheduler)

    losses, metrics, start = [], [], time.perf_counter()
    for epoch in range(num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        for batch, micro in dl.accumulate(train_dataloader, gradient_accumulation_steps):  # dl
            loss = model(**batch).loss
            dl.backward(loss, model, micro)                              # dl  accelerator.backward
            if micro.sync:
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            losses.append(float(dl.reduce(loss.detach(), env)))         # dl  gather + mean
        model.eval()
        predictions, references = [], []
        for batch in eval_dataloader:
            with torch.no_grad():
                logits = model(**batch).logits
            preds, refs = dl.gather_metrics(                             # dl  gather_for_metrics
                (logits.argmax(dim=-1), batch["labels"]), env, eval_dataloader)
            predictions.append(preds)
            references.append(refs)
        metric = accuracy_f1(torch.cat(predictions), torch.cat(references))
        metrics.append(metric)
        dl.main_print(env, f"epoch {epoch}:",                            # dl  accelerator.print
                      {k: round(v, 4) for k, v in metric.items()}, flush=True)
    result = {"losses": losses, "metrics": metrics, "seconds": time.perf_counter() - start,
              "threads": torch.get_num_threads(), "world_size": env.world_size}
    if args.output and env.is_main:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(result, handle)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Simple example of training script.")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16", "fp8"], default=None,
                        help="Whether to use mixed precision (default: the launcher's).")
    parser.add_argument("--cpu", action="store_true", help="If passed, will train on the CPU.")
    add_arguments(parser)
    args = parser.parse_args()
    config = {"lr": 1e-3, "num_epochs": args.epochs, "seed": 42, "batch_size": 16}
    training_function(config, args)


if __name__ == "__main__":
    main()
