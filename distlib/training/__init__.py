"""Training: `wrap` / `unwrap`, one applier per strategy with its `Wrapped`, and the step verbs.

Above `env` and `runtime`: an applier joins the process group and places the model; the
model it returns carries a `Wrapped` that does the strategy's backward, clipping, full weights,
self-saving and release. `accumulate`, `backward`, `clip_grad_norm` and `seed` are the loop's
verbs.
"""

from distlib.training.accumulation import MicroStep, accumulate, plan_window
from distlib.training.cp import context_parallel
from distlib.training.optimizers import DelegatingOptimizer, ScaledOptimizer
from distlib.training.scheduler import AccelerateScheduler
from distlib.training.step import autocast, backward, clip_grad_norm, seed
from distlib.training.wrapped import Wrapped, attach, detach, owner_of, wrapped_of
from distlib.training.wrapping import unwrap, wrap

__all__ = [
    "AccelerateScheduler",
    "DelegatingOptimizer",
    "MicroStep",
    "ScaledOptimizer",
    "Wrapped",
    "accumulate",
    "attach",
    "autocast",
    "backward",
    "clip_grad_norm",
    "context_parallel",
    "detach",
    "owner_of",
    "plan_window",
    "seed",
    "unwrap",
    "wrap",
    "wrapped_of",
]
