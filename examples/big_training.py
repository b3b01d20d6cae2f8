"""Train a model no rank holds whole: meta init, FSDP2, sharded load, async saves, resume anywhere.

    distlib launch --cpu --num-processes 2 examples/big_training.py --stop-at 4
    distlib launch --cpu --num-processes 3 examples/big_training.py

The first run builds a small Llama from its config on the meta device, shards it with FSDP2,
and loads each rank's slices of a safetensors checkpoint (made on first use from a seeded
model, standing in for a pretrained one: no rank ever holds the whole model). It trains with
an async save every --every steps, keeping the last two, and stops after the save at step
--stop-at, as a job cut short would. The second run, at another number of processes, finds
the latest checkpoint, re-deals the rest of the epoch over its ranks (every sample once), and
exports the final weights as safetensors. --seen writes the ids of the samples each rank
trained on (the test suite checks that the two runs saw each sample exactly once).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

import distlib as dl
from distlib.checkpoint import latest_checkpoint

CONFIG = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                  tie_word_embeddings=False)
SAMPLES, TOKENS = 68, 16  # 68 = 4 steps at 2 ranks x 4, then 3 steps at 3 ranks x 4: no padding


def pretrained(folder: Path, env: dl.Env) -> Path:
    """A seeded model saved as safetensors (the main rank writes it once); its folder."""
    if env.is_main and not (folder / "model.safetensors").exists():
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(CONFIG).save_pretrained(folder)
    dl.barrier(env)
    return folder


def data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CONFIG.vocab_size, (SAMPLES, TOKENS), generator=g)
    return torch.utils.data.TensorDataset(torch.arange(SAMPLES), tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/big", help="checkpoints and the export")
    parser.add_argument("--every", type=int, default=2, help="save every N steps")
    parser.add_argument("--stop-at", type=int, default=-1, help="stop after the save at this step")
    parser.add_argument("--seen", default=None, help="write each rank's sample ids here")
    args = parser.parse_args()
    out = Path(args.out)

    env = dl.detect()
    with dl.init_empty_weights():                                     # 1. no storage at all
        model = transformers.LlamaForCausalLM(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = dl.wrap(model, dl.FSDP(wrap_classes="auto"), env=env,
                               optimizer=optimizer)                   # 2. sharded, still meta
    dl.load_checkpoint(model, pretrained(out / "pretrained", env))    # 3. this rank's slices
    loader = dl.shard(torch.utils.data.DataLoader(
        data(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2)), env)

    step, handle, seen = 0, None, []
    last = latest_checkpoint(out / "ckpt")                            # 6. resume, if any
    if last is not None:
        step = dl.load_state(last, env, model=model, optimizer=optimizer, loader=loader)["step"]
        dl.main_print(env, f"resumed from {last.name} at {env.world_size} process(es)")
    for ids, tokens in loader:                                        # 4. train
        loss = model(input_ids=tokens, labels=tokens).loss
        dl.backward(loss, model)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        seen += ids.tolist()
        if step % args.every == 0:                                    # 5. save, don't stop
            handle = dl.save_state(out / "ckpt" / f"step-{step}", env, async_save=True,
                                   keep_last=2, model=model, optimizer=optimizer,
                                   loader=loader, step=step)
        if step == args.stop_at:
            break
    if handle is not None:
        handle.wait()
    if args.seen:
        with open(f"{args.seen}.rank{env.rank}", "a", encoding="utf-8") as file:
            file.write("".join(f"{i}\n" for i in seen))
    if step != args.stop_at:
        dl.save_model(model, out / "final", env)                      # 7. plain safetensors
        dl.main_print(env, f"trained {step} steps; exported {out / 'final'}")


if __name__ == "__main__":
    main()
