"""A pass saved at N data-parallel ranks and resumed at M: every sample exactly once (issue 17).

The samples the N ranks read before the save plus those the M ranks read after it are the
uninterrupted pass's, each once (with ``drop_last``: the pass up to the tail the M ranks'
global batch leaves out), for every flag, fixed and variable batch sizes, any step; every rank
at M gets as many batches as the others wherever a whole pass does; ``len`` counts what
streams. First over the pure plan, then through real loaders resumed twice (N -> M -> K).
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Any

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import distlib as dl
from distlib._shard_plan import ShardPlan, StepInfo, plan_resume
from distlib.testing import fake_env
from tests.generators import PLAN_SETTINGS, ResumeCase, resume_cases


def _pass(case: ResumeCase) -> list[Any]:
    """The pass in its (shuffled) order: sample ids, or batches of them for variable sizes."""
    if case.batch_sizes is None:
        order = list(range(case.num_samples))
        random.Random(case.seed).shuffle(order)
        return order
    out, at = [], 0
    for size in case.batch_sizes:
        out.append(list(range(at, at + size)))
        at += size
    return out


def _real(batch: list[Any], info: StepInfo, rank: int) -> list[Any]:
    """The rows of ``batch`` that are data, not padding (padding ends a step in rank order)."""
    before = sum(info.rows[:rank])
    return batch[:max(0, min(len(batch), info.real - before))]


def _saved_state(case: ResumeCase, plan: ShardPlan, steps: int) -> dict[str, Any]:
    units = len(case.batch_sizes) if plan.variable else case.num_samples  # type: ignore[arg-type]
    return {"epoch": 0, "start_batch": steps, "start_sample": 0,
            "position": min(units, steps * plan.per_step),
            "unit": "batches" if plan.variable else "samples", "num_units": units,
            "dp_size": plan.world_size, "batch_size": plan.batch_size,
            "split_batches": plan.split_batches}


@PLAN_SETTINGS
@given(resume_cases())
def test_a_pass_resumed_at_another_size_reads_every_sample_once(case: ResumeCase) -> None:
    stream, variable = _pass(case), case.batch_sizes is not None
    saved_plan = case.plan(case.saved_world)
    steps = min(case.steps, saved_plan.num_steps)  # a save holds a batch of this pass
    before: list[Any] = []
    for step in range(steps):  # what the N ranks read: the real rows of steps 0..steps-1
        info, positions = saved_plan.step_info(step), saved_plan.step_positions(step)
        gathered = [p for rank_positions in positions for p in rank_positions]
        before.extend(gathered[:info.real])
    state = _saved_state(case, saved_plan, steps)
    units = len(stream)
    resume = plan_resume(state, case.plan(case.world), units, call="test")
    after, counts = [], []
    for rank in range(case.world):
        plan = dataclasses.replace(case.plan(case.world, rank), start_batch=resume.start_batch,
                                   start_sample=resume.start_sample)
        batches = list(plan.iter_batches(stream))
        if not plan.variable and not plan.split_batches:  # the loader's whole-batch path
            size = case.batch_size or 1
            loader_batches = [stream[i:i + size] for i in range(0, units, size)]
            assert list(plan.iter_dealt(loader_batches)) == batches
        assert len(plan) == len(batches)  # len() counts what streams
        counts.append(len(batches))
        after.extend(s for batch, info in batches for s in _real(batch, info, rank))
    position = state["position"]
    big_g = case.plan(case.world).per_step
    kept = units if not case.drop_last else position + (units - position) // big_g * big_g
    # Positions are of samples (variable sizes: the ids themselves), the kept tail of units.
    expected = [i for b in stream[:kept] for i in b] if variable else stream[:kept]
    got = (before if variable else [stream[p] for p in before]) + after
    assert Counter(got) == Counter(expected)  # exactly once each: no repeat, no gap
    if case.drop_last or (case.even_batches and case.world > 1):
        assert len(set(counts)) == 1  # collectives cannot hang on a missing batch


@PLAN_SETTINGS
@given(resume_cases(variable=False))
def test_positions_of_the_re_dealt_pass_match_what_streams(case: ResumeCase) -> None:
    stream = _pass(case)
    for rank in range(case.world):
        plan = dataclasses.replace(case.plan(case.world, rank),
                                   start_sample=min(case.steps * 3, case.num_samples))
        streamed = list(plan.iter_batches(stream))
        expected = [([stream[p] for p in plan.step_positions(s)[rank]], plan.step_info(s))
                    for s in range(plan.num_steps) if plan.step_positions(s)[rank]]
        assert streamed == expected


# -- through real loaders: N -> M -> K, map-style, shuffled ---------------------------------

def _loader(case: ResumeCase, rank: int, world: int) -> Any:
    data = DataLoader(list(range(case.num_samples)), batch_size=case.batch_size or 1,
                      shuffle=True, drop_last=case.drop_last,
                      generator=torch.Generator().manual_seed(case.seed))
    return dl.shard(data, fake_env(rank, world), split_batches=case.split_batches,
                    even_batches=case.even_batches)


def _read(loader: Any, rank: int, steps: int | None) -> tuple[list[int], int]:
    """The real samples of ``steps`` batches (all when None) and how many batches came."""
    real, got = [], 0
    if steps == 0:
        return real, got
    for batch in loader:
        info = loader.metrics_layout()[1][-1]
        real.extend(_real(batch.tolist(), info, rank))
        got += 1
        if got == steps:
            break
    return real, got


@settings(max_examples=60, deadline=None)
@given(resume_cases(variable=False, max_world=4, max_samples=40),
       st.integers(1, 4), st.integers(0, 6))
def test_real_loaders_resumed_twice_read_every_sample_once(case: ResumeCase, third: int,
                                                           steps_at_m: int) -> None:
    assume(case.num_samples > 0)  # a RandomSampler needs a sample
    if case.split_batches and (case.batch_size or 1) % third:
        third = case.world  # split_batches: the batch must divide over the third job too
    seen, state = [], None
    for world, steps in ((case.saved_world, case.steps), (case.world, steps_at_m),
                         (third, None)):
        counts, states = [], []
        for rank in range(world):
            loader = _loader(case, rank, world)
            if state is not None:
                loader.load_state_dict(state)
            remaining = loader.remaining
            real, got = _read(loader, rank, steps)
            seen.extend(real)
            counts.append(got)
            if steps is None:
                assert got == remaining  # remaining counted what the resumed pass yields
            states.append(loader.state_dict())
        if steps is None and (case.drop_last or (case.even_batches and world > 1)):
            assert len(set(counts)) == 1
        state = states[0]  # save_state keeps rank 0's loader state
        if state["epoch"] == 1:  # that job finished the pass: nothing is left to resume
            break
    pass_length = case.num_samples - (case.num_samples % (case.batch_size or 1)
                                      if case.drop_last else 0)
    assert len(seen) == len(set(seen))  # no sample twice
    assert set(seen) <= set(range(case.num_samples))
    if not case.drop_last:
        assert sorted(seen) == list(range(pass_length))  # and none missing
