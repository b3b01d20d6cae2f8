"""split_between_processes for any input length and world size 1-8 (pure: no group needed)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import distlib as dl
from distlib.testing import fake_env
from tests.generators import PLAN_SETTINGS, world_and_rank


def _chunk(items: list[int], world: int, rank: int, pad: bool) -> list[int]:
    env = fake_env(rank, world)
    with dl.split_between_processes(items, env, apply_padding=pad) as mine:
        return list(mine)


@PLAN_SETTINGS
@given(st.integers(0, 60), world_and_rank())
def test_chunks_are_contiguous_balanced_and_cover_in_order(n: int, wr: tuple[int, int]) -> None:
    world, _ = wr
    items = list(range(n))
    chunks = [_chunk(items, world, r, False) for r in range(world)]
    assert [i for c in chunks for i in c] == items
    extra = n % world if world > 1 else 0
    assert [len(c) for c in chunks] == [n // world + (r < extra) for r in range(world)] or (
        world == 1 and chunks == [items])
    padded = [_chunk(items, world, r, True) for r in range(world)]
    if n and world > 1:
        assert len({len(p) for p in padded}) == 1
        for p, c in zip(padded, chunks, strict=True):
            assert p[:len(c)] == c and set(p[len(c):]) <= {items[-1]}
