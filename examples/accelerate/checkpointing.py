"""Accelerate's ``examples/by_feature/checkpointing.py`` ported to distlib.

The nlp example, saving its whole training state every ``--checkpointing_steps`` steps (or each
epoch) and resuming from one with ``--resume_from_checkpoint``, with upstream's arithmetic for
where to start again. A resumed run trains exactly as the uninterrupted one (dropout masks and
the shuffle included):

    distlib launch --cpu --num-processes 2 examples/accelerate/checkpointing.py \\
        --checkpointing_steps 5 --output_dir ckpt --stop_after 7
    distlib launch --cpu --num-processes 2 examples/accelerate/checkpointing.py \\
        --resume_from_checkpoint ckpt/step_5
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from mrpc_like import accuracy_f1, collate_fn, make_split, tiny_bert
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

import distlib as dl


def training_function(config: dict[str, float], args: argparse.Namespace) -> None:
    env = dl.detect(cpu=args.cpu)                                        # dl  Accelerator(cpu=)
    lr, num_epochs, seed = config["lr"], int(config["num_epochs"]), int(config["seed"])
    checkpointing_steps: int | str | None = args.checkpointing_steps
    if checkpointing_steps is not None and checkpointing_steps.isdigit():
        checkpointing_steps = int(checkpointing_steps)
    train, validation = make_split(args.train_size, seed=1), make_split(args.eval_size, seed=2)
    dl.seed(seed, env)                                                   # dl  set_seed(seed)
    train_dataloader = dl.shard(DataLoader(train, shuffle=True, collate_fn=collate_fn,  # dl
                                           batch_size=int(config["batch_size"])), env)
    eval_dataloader = dl.shard(DataLoader(validation, shuffle=False, collate_fn=collate_fn,
                                          batch_size=32), env)
    model = tiny_bert()
    optimizer = torch.optim.AdamW(params=model.parameters(), lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer, num_warmup_steps=2,
        num_training_steps=len(train_dataloader) * num_epochs)
    model, optimizer, lr_scheduler = dl.wrap(                           # dl  accelerator.prepare
        model, env, optimizer=optimizer, scheduler=lr_scheduler)
    state = {"model": model, "optimizer": optimizer, "scheduler": lr_scheduler,
             "loader": train_dataloader}

    overall_step, starting_epoch, resume_step = 0, 0, None
    if args.resume_from_checkpoint:
        dl.load_state(args.resume_from_checkpoint, env, **state)         # dl  accelerator.load_state
        dl.main_print(env, f"Resumed from checkpoint: {args.resume_from_checkpoint}")
        training_difference = os.path.splitext(os.path.basename(args.resume_from_checkpoint))[0]
        if "epoch" in training_difference:
            starting_epoch = int(training_difference.replace("epoch_", "")) + 1
        else:  # upstream's arithmetic: the step, counted from the start of training
            resume_step = int(training_difference.replace("step_", ""))
            starting_epoch = resume_step // len(train_dataloader)
            overall_step = resume_step
            resume_step -= starting_epoch * len(train_dataloader)

    losses = []
    for epoch in range(starting_epoch, num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        if args.resume_from_checkpoint and epoch == starting_epoch and resume_step is not None:
            # load_state already put the loader there; this is upstream's line, and it agrees.
            active_dataloader = dl.skip_first_batches(train_dataloader, resume_step)  # dl
        else:
            active_dataloader = train_dataloader
        for batch in active_dataloader:
            loss = model(**batch).loss
            dl.backward(loss, model)                                     # dl  accelerator.backward
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            overall_step += 1
            losses.append((overall_step, float(dl.reduce(loss.detach(), env))))
            if isinstance(checkpointing_steps, int) and overall_step % checkpointing_steps == 0:
                dl.save_state(os.path.join(args.output_dir, f"step_{overall_step}"), env,
                              **state)                                   # dl  accelerator.save_state
            if args.stop_after and overall_step == args.stop_after:
                _write(args, env, losses, [])
                return  # a crash, as far as the next run can tell
        model.eval()
        predictions, references = [], []
        for batch in eval_dataloader:
            with torch.no_grad():
                logits = model(**batch).logits
            preds, refs = dl.gather_metrics((logits.argmax(dim=-1), batch["labels"]), env,
                                            eval_dataloader)
            predictions.append(preds)
            references.append(refs)
        metric = accuracy_f1(torch.cat(predictions), torch.cat(references))
        dl.main_print(env, f"epoch {epoch}:", metric)                    # accelerator.print
        if checkpointing_steps == "epoch":
            dl.save_state(os.path.join(args.output_dir, f"epoch_{epoch}"), env, **state)
    _write(args, env, losses, [p.tolist() for p in dl.unwrap(model).parameters()][-1])


def _write(args: argparse.Namespace, env: dl.Env, losses: list[tuple[int, float]],
           last_layer: list[float]) -> None:
    if args.output and env.is_main:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"losses": losses, "last_layer": last_layer}, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description="Simple example of training script.")
    parser.add_argument("--cpu", action="store_true", help="If passed, will train on the CPU.")
    parser.add_argument("--checkpointing_steps", default=None,
                        help="save the state every n steps, or 'epoch' after each epoch")
    parser.add_argument("--resume_from_checkpoint", default=None,
                        help="a folder written by --checkpointing_steps to resume from")
    parser.add_argument("--output_dir", default=".", help="where checkpoints go")
    parser.add_argument("--stop_after", type=int, default=0, help="stop after this step")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--eval-size", type=int, default=64)
    parser.add_argument("--output", default=None, help="write the losses here (JSON)")
    args = parser.parse_args()
    training_function({"lr": 1e-3, "num_epochs": args.epochs, "seed": 42, "batch_size": 16}, args)


if __name__ == "__main__":
    main()
