"""``distlib merge-weights CHECKPOINT OUT``: a `save_state` checkpoint's model as safetensors.

torch and the checkpoint code are imported when the command runs, so ``--help`` answers
without them (as every ``distlib`` subcommand does).
"""

from __future__ import annotations

import argparse
import os
import sys

from distlib._progress import is_shown
from distlib.cli._args import Switch, spellings

__all__ = ["add_arguments", "run"]

# --dtype's choices -> the torch dtype each names (an attribute of torch)
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``distlib merge-weights`` to ``parser``."""
    parser.add_argument("checkpoint", help="a folder written by save_state")
    parser.add_argument("out", help="the folder to write the safetensors export to")
    parser.add_argument("--name", default="model", help="which saved model (default: model)")
    parser.add_argument(*spellings("--max-shard-size"), default="5GB", metavar="SIZE",
                        help="the largest file, e.g. 5GB, 500MB (default: 5GB)")
    parser.add_argument("--dtype", default=None, choices=list(_DTYPES),
                        help="convert floating weights (default: keep)")
    parser.add_argument(*Switch.flags("--progress"), action=Switch, default=None,
                        help="progress bars in bytes on stderr (default: when stderr is a "
                             "terminal)")


def run(args: argparse.Namespace) -> int:
    """Merge the checkpoint's shards into ``args.out`` and print the files written.

    Effects: writes ``args.out`` (atomically); prints one line, and progress bars to stderr
    when it is a terminal (or ``--progress``).
    """
    import torch

    from distlib.checkpoint.export import merge_weights

    progress = is_shown(args.progress, main=True, stream=sys.stderr)
    dtype = None if args.dtype is None else getattr(torch, _DTYPES[args.dtype])
    out = merge_weights(args.checkpoint, args.out, name=args.name,
                        max_shard_size=args.max_shard_size, dtype=dtype, progress=progress)
    files = sorted(os.listdir(out))
    print(f"wrote {len(files)} file(s) to {out}: {', '.join(files)}")
    return 0
