"""len() of a sharded loader is the epoch, `remaining` what the pass has left, for any shape.

Every rank of an N-rank job in one process (a sequential sampler needs no agreed seed, so no
process group); start steps anywhere from 0 to past the end of the epoch.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import distlib as dl
from distlib.data import skip_first_batches
from distlib.testing import fake_env
from tests.generators import world_and_rank

SETTINGS = settings(max_examples=60, deadline=None)


def _loader(n: int, batch: int, drop_last: bool) -> DataLoader[int]:
    return DataLoader(list(range(n)), batch_size=batch, drop_last=drop_last)


@SETTINGS
@given(world_rank=world_and_rank(4), n=st.integers(0, 40), per_rank=st.integers(1, 5),
       drop_last=st.booleans(), even=st.booleans(), split=st.booleans(),
       start=st.integers(0, 12))
def test_len_remaining_and_skip_agree_with_a_fresh_pass(
        world_rank: tuple[int, int], n: int, per_rank: int, drop_last: bool, even: bool,
        split: bool, start: int) -> None:
    world, rank = world_rank
    env = fake_env(rank, world)
    batch = per_rank * world if split else per_rank
    options = {"split_batches": split, "even_batches": even}
    fresh = [b.tolist() for b in dl.shard(_loader(n, batch, drop_last), env, **options)]
    loader = dl.shard(_loader(n, batch, drop_last), env, start_batch=start, **options)
    assert len(loader) == len(fresh)
    assert loader.remaining == max(0, len(fresh) - start)
    left = []
    for b in loader:
        left.append(loader.remaining)
        assert len(loader) == len(fresh)
        assert b.tolist() == fresh[start + len(left) - 1]
    assert left == list(range(len(fresh) - start - 1, -1, -1))
    assert (len(loader), loader.remaining) == (len(fresh), len(fresh))
    k = min(start, len(fresh))
    view = skip_first_batches(loader, k)
    assert (len(view), view.remaining) == (len(fresh), len(fresh) - k)
    assert [b.tolist() for b in view] == fresh[k:]
    assert [b.tolist() for b in loader] == fresh  # the pass after the skipped one is whole
