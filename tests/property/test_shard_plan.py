"""Invariants of the pure shard planner, for every flag, world sizes 1-8, tiny datasets."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from distlib._shard_plan import ShardPlan, StepInfo, keep_index
from tests.generators import PLAN_SETTINGS, shard_plans


def _for_rank(plan: ShardPlan, rank: int) -> ShardPlan:
    return dataclasses.replace(plan, rank=rank, start_batch=0)


def _kept(plan: ShardPlan) -> int:
    """Samples a pass keeps: all of them, or those of the full steps with drop_last."""
    if plan.variable:
        sizes = plan.batch_sizes or ()
        kept_batches = len(sizes) if not plan.drop_last else plan.num_steps * plan.world_size
        return sum(sizes[:kept_batches])
    assert plan.num_samples is not None
    return plan.num_steps * plan.per_step if plan.drop_last else plan.num_samples


def _stream(plan: ShardPlan) -> list[object]:
    """The pass as the loader sees it: sample indices, or batches of them."""
    if not plan.variable:
        return list(range(plan.num_samples or 0))
    out, at = [], 0
    for size in plan.batch_sizes or ():
        out.append(list(range(at, at + size)))
        at += size
    return out


def _all_ranks(plan: ShardPlan) -> list[list[tuple[list[int], StepInfo]]]:
    return [list(_for_rank(plan, r).iter_batches(_stream(plan)))
            for r in range(plan.world_size)]


@PLAN_SETTINGS
@given(shard_plans())
def test_dedup_of_the_interleaved_gather_is_the_dataset_in_order(plan: ShardPlan) -> None:
    # Covers every (kept) index, disjoint apart from the reported padding, in order.
    seen: list[int] = []
    for step in range(plan.num_steps):
        positions = plan.step_positions(step)
        gathered = [p for rank_positions in positions for p in rank_positions]
        info = plan.step_info(step)
        assert info.rows == tuple(len(p) for p in positions)
        seen.extend(gathered[:info.real])
    assert seen == list(range(_kept(plan)))


@PLAN_SETTINGS
@given(shard_plans())
def test_streaming_matches_the_positions_for_every_rank(plan: ShardPlan) -> None:
    for rank, batches in enumerate(_all_ranks(plan)):
        expected = [(list(plan.step_positions(s)[rank]), plan.step_info(s))
                    for s in range(plan.num_steps) if plan.step_positions(s)[rank]]
        assert batches == expected
        assert len(_for_rank(plan, rank)) == len(batches) == plan.counts(rank)[1]


@PLAN_SETTINGS
@given(shard_plans())
def test_even_batches_give_every_rank_the_same_batches(plan: ShardPlan) -> None:
    per_rank = _all_ranks(plan)
    if plan.pads or plan.drop_last:
        assert len({len(batches) for batches in per_rank}) == 1
        if not plan.variable and plan.world_size > 1:
            assert {len(b) for batches in per_rank for b, _ in batches} <= {plan.per_rank}
    # Whatever the flags, no rank ever gets more batches than the pass has steps.
    assert all(len(batches) <= plan.num_steps for batches in per_rank)


@PLAN_SETTINGS
@given(shard_plans(), st.integers(0, 30))
def test_start_batch_yields_the_tail_of_the_full_plan(plan: ShardPlan, start: int) -> None:
    full = list(dataclasses.replace(plan, start_batch=0).iter_batches(_stream(plan)))
    resumed = dataclasses.replace(plan, start_batch=start)
    assert list(resumed.iter_batches(_stream(plan))) == full[start:]
    assert len(resumed) == len(full[start:])


@PLAN_SETTINGS
@given(shard_plans(), st.booleans())
def test_whole_pass_dedup_gives_back_the_dataset(plan: ShardPlan, padded: bool) -> None:
    per_rank = _all_ranks(plan)
    infos = [info for _, info in per_rank[0]] if per_rank[0] else []
    longest = max(len(b) for b in per_rank)
    steps = [plan.step_info(s) for s in range(plan.num_steps)]
    if longest and not infos:
        infos = steps
    assert len(steps) == longest
    # What each rank holds after a whole pass, gathered rank after rank (padded or not).
    blocks = [[i for batch, _ in batches for i in batch] for batches in per_rank]
    stride = max(len(b) for b in blocks) if padded else None
    gathered: list[int] = []
    for block in blocks:
        gathered += block + ([-1] * (stride - len(block)) if stride else [])
    kept = [gathered[i] for i in keep_index(steps, stride)]
    assert kept == list(range(_kept(plan)))


@PLAN_SETTINGS
@given(shard_plans(variable=False))
def test_dealing_whole_loader_batches_is_the_same_plan(plan: ShardPlan) -> None:
    n, size = plan.num_samples or 0, plan.batch_size or 1
    batches = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    if plan.drop_last:
        batches = [b for b in batches if len(b) == size]
    flat = [i for b in batches for i in b]
    assert list(plan.iter_dealt(batches)) == list(plan.iter_batches(flat))
    # A batch sampler whose batches are not all full is cut by samples as well.
    odd = [[0], *batches]
    assert list(plan.iter_dealt(odd)) == list(plan.iter_batches([0, *flat]))
