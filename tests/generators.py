"""Shared hypothesis generators for distlib's property tests (others may append)."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

from distlib._shard_plan import ShardPlan

__all__ = ["PLAN_SETTINGS", "shard_plans", "world_and_rank"]

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
