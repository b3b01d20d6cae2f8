"""Shared hypothesis generators for distlib's property tests (others may append)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

from distlib._shard_plan import ShardPlan

__all__ = ["PLAN_SETTINGS", "ResumeCase", "resume_cases", "shard_plans", "world_and_rank"]

# For the planner's properties: many examples (they are cheap), no deadline (the first example
# of a session pays for imports). A decorator, so that no global profile changes other tests.
PLAN_SETTINGS = settings(max_examples=300, deadline=None)


@st.composite
def world_and_rank(draw: Any, max_world: int = 8) -> tuple[int, int]:
    """A world size in 1..max_world and a rank in it."""
    world = draw(st.integers(1, max_world))
    return world, draw(st.integers(0, world - 1))


@st.composite
def shard_plans(draw: Any, *, variable: bool | None = None, max_samples: int = 120) -> ShardPlan:
    """Any valid ShardPlan: world sizes 1-8, dataset lengths from 0 (often fewer than ranks),
    fixed or variable batch sizes, every flag and a start batch."""
    world, rank = draw(world_and_rank())
    is_variable = draw(st.booleans()) if variable is None else variable
    drop_last, even = draw(st.booleans()), draw(st.booleans())
    start = draw(st.integers(0, 4))
    if is_variable:
        sizes = tuple(draw(st.lists(st.integers(1, 6), max_size=20)))
        return ShardPlan(batch_size=None, batch_sizes=sizes, num_samples=sum(sizes),
                         world_size=world, rank=rank, drop_last=drop_last, even_batches=even,
                         start_batch=start)
    split = draw(st.booleans())
    per_rank = draw(st.integers(1, 6))
    batch = per_rank * world if split else draw(st.integers(1, 12))
    return ShardPlan(num_samples=draw(st.integers(0, max_samples)), batch_size=batch,
                     world_size=world, rank=rank, drop_last=drop_last, split_batches=split,
                     even_batches=even, start_batch=start)


@dataclass(frozen=True)
class ResumeCase:
    """A pass saved at ``saved_world`` data-parallel ranks after ``steps`` steps and resumed at
    ``world`` ranks; the loader settings of both jobs (the batch size is the loader's)."""

    saved_world: int
    world: int
    num_samples: int
    batch_size: int | None
    batch_sizes: tuple[int, ...] | None
    steps: int
    split_batches: bool
    drop_last: bool
    even_batches: bool
    seed: int

    def plan(self, world: int, rank: int = 0) -> ShardPlan:
        """The whole pass's plan at ``world`` ranks."""
        return ShardPlan(num_samples=self.num_samples, batch_size=self.batch_size,
                         batch_sizes=self.batch_sizes, world_size=world, rank=rank,
                         drop_last=self.drop_last, split_batches=self.split_batches,
                         even_batches=self.even_batches)


@st.composite
def resume_cases(draw: Any, *, variable: bool | None = None, max_world: int = 5,
                 max_samples: int = 60) -> ResumeCase:
    """A save at N ranks and a resume at M (1..max_world each), any flags, any step of the
    pass (also past its end), fixed or variable batch sizes; with ``split_batches`` the batch
    size is a multiple of both N and M."""
    saved_world, world = draw(st.integers(1, max_world)), draw(st.integers(1, max_world))
    is_variable = draw(st.booleans()) if variable is None else variable
    split = not is_variable and draw(st.booleans())
    sizes: tuple[int, ...] | None = None
    if is_variable:
        sizes = tuple(draw(st.lists(st.integers(1, 5), max_size=16)))
        batch, n = None, sum(sizes)
    else:
        batch = math.lcm(saved_world, world) * draw(st.integers(1, 2)) if split else draw(st.integers(1, 6))
        n = draw(st.integers(0, max_samples))
    return ResumeCase(saved_world=saved_world, world=world, num_samples=n, batch_size=batch,
                      batch_sizes=sizes, steps=draw(st.integers(0, 12)), split_batches=split,
                      drop_last=draw(st.booleans()), even_batches=draw(st.booleans()),
                      seed=draw(st.integers(0, 2**16)))

