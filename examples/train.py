"""Train a small character-level language model on public-domain text, on any setup.

One process:                python examples/train.py
Two CPU processes, DDP:     distlib launch --cpu --num-processes 2 examples/train.py
Another strategy:           distlib launch --cpu --num-processes 2 examples/train.py --strategy fsdp
A quick run (CI):           python examples/train.py --quick

The model reads the previous CONTEXT characters and predicts the next one. The loss starts near
ln(vocabulary size) and falls as the model learns the text; the main rank shows a progress bar
and, at the end, the job's throughput (tokens/s: the characters the model reads, CONTEXT per
sample; MFU with --peak-tflops, as a CPU has no known peak) and a sample the model writes from
the text's first CONTEXT characters: once trained, it continues the text ("Four score and seven
years ago our fathers brought ..."). The loss, the learning rate and the step meter's reports
go to a JSON-lines tracker: <run-dir>/train/metrics.jsonl. The distlib lines are marked "# dl".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import distlib as dl
from distlib.strategies import STRATEGY_NAMES, parse_strategy

CONTEXT = 24
TEXT = Path(__file__).parent / "data" / "public_domain.txt"


class Block(nn.Module):
    """A residual MLP block; FSDP can shard each one as its own unit (--wrap-classes Block)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class CharModel(nn.Module):
    """Embed CONTEXT characters, mix them with MLP blocks, predict the next character."""

    def __init__(self, vocab: int, dim: int = 16, width: int = 128, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(CONTEXT * dim, width)
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.head = nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.embed(idx).flatten(1))
        return self.head(self.blocks(x))


def dataset(text: str) -> tuple[torch.utils.data.TensorDataset, list[str]]:
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    windows = ids.unfold(0, CONTEXT + 1, 1)  # every CONTEXT+1 slice of the text
    return torch.utils.data.TensorDataset(windows[:, :-1], windows[:, -1]), chars


def strategy_from(args: argparse.Namespace) -> object | None:
    if args.strategy is None:
        return None  # the launcher's choice (env.strategy)
    options = {"fsdp": {"wrap_classes": ("Block",)}, "deepspeed": {"zero_stage": args.zero_stage}}
    return parse_strategy(args.strategy, options.get(args.strategy))


@torch.no_grad()
def sample(model: nn.Module, chars: list[str], env: dl.Env, prompt: str, n: int) -> str:
    """Greedy continuation of ``prompt``; every rank runs it (sharded models need all ranks).

    The model only ever saw CONTEXT characters of the text, so the prompt is CONTEXT characters
    or more of characters it knows, never padded with anything it did not see.
    """
    unknown = sorted(set(prompt) - set(chars))
    if len(prompt) < CONTEXT or unknown:
        msg = (f"sample(): prompt must be at least {CONTEXT} characters of the training text's "
               f"alphabet, but got {prompt!r} ({len(prompt)} characters, unknown: {unknown}). "
               f"Take the prompt from the text, e.g. text[:{CONTEXT}].")
        raise ValueError(msg)
    model.eval()
    ids = [chars.index(c) for c in prompt]
    for _ in range(n):
        logits = model(torch.tensor([ids[-CONTEXT:]], device=env.device))
        ids.append(int(logits[0].argmax()))
    model.train()
    return "".join(chars[i] for i in ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=STRATEGY_NAMES[:4], default=None,
                        help="override the launcher's strategy")
    parser.add_argument("--zero-stage", type=int, default=2, help="ZeRO stage for deepspeed")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default=None,
                        help="override the launcher's precision")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per rank per batch")
    parser.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--quick", action="store_true", help="a short run (40 steps) for CI")
    parser.add_argument("--run-dir", default="runs", help="where the tracker writes (train/...)")
    parser.add_argument("--log-every", type=int, default=10, help="steps between logged losses")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="one device's peak TFLOP/s, for MFU (looked up on known GPUs)")
    args = parser.parse_args()
    steps = 40 if args.quick else args.steps

    env = dl.detect()                                                              # dl
    if args.precision is not None:
        env = dataclasses.replace(env, precision=args.precision)
    dl.seed(0, env)                                                                # dl
    text = TEXT.read_text(encoding="utf-8")
    data, chars = dataset(text)
    # A seeded generator: every strategy sees the same batches (losses can be compared).
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, generator=torch.Generator().manual_seed(0))
    loader = dl.shard(loader, env)                                                 # dl
    model = CharModel(len(chars))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
    model, optimizer, scheduler = dl.wrap(model, strategy_from(args), env=env,     # dl
                                          optimizer=optimizer, scheduler=scheduler)

    peak = None if args.peak_tflops is None else args.peak_tflops * 1e12
    meter = dl.StepMeter(env, log_every=args.log_every, peak_flops=peak)           # dl
    run = dl.init_trackers(env, ["jsonl"], project_dir=args.run_dir,               # dl
                           project_name="train", config=vars(args))
    # The first optimizer step's model FLOPs, all its micro-batches, forward and backward.
    counting = contextlib.ExitStack()
    counting.enter_context(meter.count_flops())                                    # dl

    bar = tqdm(total=steps, disable=not env.is_main, desc="train", unit="step")
    first = last = None
    step, epoch, rows, start = 0, 0, 0, time.perf_counter()
    while step < steps:
        loader.set_epoch(epoch)
        for (x, y), micro in dl.accumulate(loader, steps=args.accumulate):         # dl
            loss = nn.functional.cross_entropy(model(x), y)
            dl.backward(loss, model, micro)                                        # dl
            rows += len(x)
            if not micro.sync:
                continue
            counting.close()  # the first step is counted; closing again does nothing
            dl.clip_grad_norm(model, 1.0)                                          # dl
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            # Every log_every steps the meter reports (one all-gather); {} in between.
            report = meter.step(samples=rows, tokens=rows * CONTEXT)                # dl
            if report:
                run.log(report, step=step)                                         # dl
            rows = 0
            if step % args.log_every == 0 or step in (1, steps):
                mean = float(dl.reduce(loss.detach(), env))                        # dl
                first = mean if first is None else first
                last = mean
                run.log({"loss": mean, "lr": scheduler.get_last_lr()[0]}, step=step)  # dl
                bar.set_postfix(loss=f"{mean:.3f}")
            bar.update(1)
            if step == steps:
                break
        epoch += 1
    bar.close()
    seconds = time.perf_counter() - start
    summary = meter.summary()  # every timed step, over the ranks (every rank calls it)  # dl
    run.close()                                                                    # dl
    # The prompt is the text's first CONTEXT characters: a trained model continues the text.
    written = sample(model, chars, env, text[:CONTEXT], 60)
    if env.is_main:
        print(f"{env.strategy.name if args.strategy is None else args.strategy}, "
              f"{env.world_size} process(es), precision {env.precision}: loss {first:.3f} -> "
              f"{last:.3f} (uniform guess: {math.log(len(chars)):.3f}) in {seconds:.1f} s")
        print(throughput(summary, env, peak))
        print(f"metrics: {Path(args.run_dir) / 'train' / 'metrics.jsonl'}")
        print(f"sample: {written!r}")


def throughput(summary: dict[str, object], env: dl.Env, peak: float | None) -> str:
    """The meter's summary as two lines: tokens/s, samples/s, GFLOP/s per rank; MFU."""
    tflops, mfu = summary["tflops_per_rank"], summary["mfu"]
    if isinstance(mfu, float):
        shown = f"MFU {mfu:.1%}" + ("" if peak is None else f" of {peak / 1e12:g} TFLOP/s")
    elif env.device.startswith("cuda"):
        shown = "MFU n/a on this GPU (pass --peak-tflops)"
    else:
        shown = "MFU n/a on CPU (pass --peak-tflops)"
    per_rank = (f"{tflops * 1e3:,.2f} GFLOP/s per rank" if isinstance(tflops, float)
                else "FLOPs n/a")
    return (f"throughput: {summary['tokens_per_s']:,.0f} tokens/s, "
            f"{summary['samples_per_s']:,.0f} samples/s, {per_rank}\n{shown}")


if __name__ == "__main__":
    main()
