"""A migrating user sees Accelerate's batches: the planner against Accelerate's own shards."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given

from distlib._shard_plan import ShardPlan
from tests.generators import PLAN_SETTINGS, shard_plans

data_loader = pytest.importorskip("accelerate.data_loader")
torch_data = pytest.importorskip("torch.utils.data")


class _Batches:
    """A batch sampler without batch_size (variable-size batches)."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.sizes = sizes

    def __iter__(self):  # type: ignore[no-untyped-def]
        at = 0
        for size in self.sizes:
            yield list(range(at, at + size))
            at += size

    def __len__(self) -> int:
        return len(self.sizes)


def _theirs(plan: ShardPlan, rank: int) -> list[list[int]]:
    if plan.variable:
        sampler: object = _Batches(plan.batch_sizes or ())
    else:
        sampler = torch_data.BatchSampler(range(plan.num_samples or 0), plan.batch_size,
                                          plan.drop_last)
    shard = data_loader.BatchSamplerShard(sampler, num_processes=plan.world_size,
                                          process_index=rank, split_batches=plan.split_batches,
                                          even_batches=plan.even_batches)
    return [list(b) for b in shard]


def _ours(plan: ShardPlan, rank: int) -> list[list[int]]:
    mine = dataclasses.replace(plan, rank=rank, start_batch=0)
    if plan.variable:
        return [b for b, _ in mine.iter_batches(_Batches(plan.batch_sizes or ()))]
    # The batch sampler already dropped the short batch: the stream is what it yields.
    stream = [i for b in torch_data.BatchSampler(range(plan.num_samples or 0),
                                                 plan.batch_size, plan.drop_last) for i in b]
    return [b for b, _ in mine.iter_batches(stream)]


@PLAN_SETTINGS
@given(shard_plans())
def test_same_batches_as_accelerate_batch_sampler_shard(plan: ShardPlan) -> None:
    if plan.world_size == 1:
        return  # Accelerate does not shard a single process at all (nor does distlib pad it).
    if plan.variable and plan.drop_last:
        return  # Accelerate reads drop_last off the batch sampler, which has none here.
    for rank in range(plan.world_size):
        assert _ours(plan, rank) == _theirs(plan, rank), rank


@PLAN_SETTINGS
@given(shard_plans(variable=False))
def test_same_samples_as_accelerate_iterable_dataset_shard(plan: ShardPlan) -> None:
    if plan.world_size == 1 or not plan.even_batches:
        return  # Accelerate always completes the last batch of an iterable dataset.
    for rank in range(plan.world_size):
        theirs = list(data_loader.IterableDatasetShard(
            range(plan.num_samples or 0), batch_size=plan.batch_size, drop_last=plan.drop_last,
            num_processes=plan.world_size, process_index=rank, split_batches=plan.split_batches))
        mine = dataclasses.replace(plan, rank=rank, start_batch=0)
        ours = [i for b, _ in mine.iter_batches(range(plan.num_samples or 0)) for i in b]
        assert ours == theirs, rank
