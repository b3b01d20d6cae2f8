"""A sharded loader's randomness, length and resume in one process (issue 11, items 2-4, 8).

The shuffle seed of a loader without a generator is one draw from the global torch RNG; after
that no pass draws from it (worker seeds come from a private generator), so a resumed run sees
the RNG stream of one that never stopped. ``len()`` is the epoch, ``remaining`` what is left.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
)

import distlib as dl
from distlib.data import skip_first_batches
from distlib.env import Env
from distlib.errors import ShardingError
from distlib.testing import fake_env
from tests.models import Stream

ONE = Env()


def _flat(loader: Any) -> list[int]:
    return [int(i) for b in loader for i in torch.as_tensor(b).reshape(-1).tolist()]


def _one_draw_after(state: torch.Tensor) -> torch.Tensor:
    """The global RNG state after exactly one int64 draw from ``state``."""
    saved = torch.get_rng_state()
    torch.set_rng_state(state)
    torch.empty((), dtype=torch.int64).random_()
    after = torch.get_rng_state()
    torch.set_rng_state(saved)
    return after


class Noisy(Dataset[int]):
    """Each read draws from the torch RNG of the process that reads it (a worker)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        return int(torch.randint(0, 2**30, ()).item())


class Reverse(Sampler[int]):
    """A sampler of the user's own, drawing nothing."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(range(self.n - 1, -1, -1))

    def __len__(self) -> int:
        return self.n


# -- item 2: the seed comes from the torch RNG ----------------------------------------------

def _shuffled_order(seed: int, **kw: Any) -> tuple[list[int], list[int], int]:
    torch.manual_seed(seed)
    loader = dl.shard(DataLoader(list(range(24)), batch_size=4, shuffle=True, **kw), ONE)
    return _flat(loader), _flat(loader), loader.state_dict()["seed"]


def test_shuffle_seed_is_one_draw_from_the_torch_rng() -> None:
    first, second, seed = _shuffled_order(42)
    assert _shuffled_order(42) == (first, second, seed)  # same manual_seed: same run
    other = _shuffled_order(43)
    assert other[0] != first and other[2] != seed
    assert first != second and sorted(first) == sorted(second) == list(range(24))
    torch.manual_seed(42)
    assert seed == int(torch.empty((), dtype=torch.int64).random_().item())
    # dl.seed is torch.manual_seed here (and agrees across ranks without device_specific).
    dl.seed(42, ONE)
    assert _flat(dl.shard(DataLoader(list(range(24)), batch_size=4, shuffle=True), ONE)) == first


def test_a_generator_of_the_user_gives_the_seed_and_stays_the_users() -> None:
    user = torch.Generator().manual_seed(7)
    loader = dl.shard(DataLoader(list(range(12)), batch_size=3, shuffle=True, generator=user),
                      ONE)
    before = torch.get_rng_state()
    order = _flat(loader)
    assert torch.equal(before, torch.get_rng_state())  # nothing drawn from the global RNG
    assert loader.state_dict()["seed"] == 7
    assert loader._inner_loader(0).generator is user  # the inner loader keeps the user's one
    assert order == _flat(dl.shard(DataLoader(list(range(12)), batch_size=3, shuffle=True,
                                              generator=torch.Generator().manual_seed(7)), ONE))


# -- item 3: no pass draws from the global RNG once the seed is known ------------------------

LOADERS: dict[str, tuple[Callable[[], DataLoader[Any]], int]] = {
    # name: (the user's loader, draws of the first pass: 1 when a seed must be chosen)
    "random": (lambda: DataLoader(list(range(10)), batch_size=3, shuffle=True), 1),
    "sequential": (lambda: DataLoader(list(range(10)), batch_size=3), 0),
    "custom-sampler": (lambda: DataLoader(list(range(10)), batch_size=3,
                                          sampler=Reverse(10)), 0),
    "batch-sampler-as-sampler": (lambda: DataLoader(
        torch.arange(10), batch_size=None,
        sampler=BatchSampler(RandomSampler(range(10)), batch_size=3, drop_last=False)), 1),
    "no-batching-shuffled": (lambda: DataLoader(list(range(10)), batch_size=None,
                                                shuffle=True), 1),
    "iterable": (lambda: DataLoader(Stream(10), batch_size=3), 0),
    "workers": (lambda: DataLoader(list(range(10)), batch_size=3, num_workers=1), 1),
    "workers-shuffled": (lambda: DataLoader(list(range(10)), batch_size=3, shuffle=True,
                                            num_workers=1), 1),
    "persistent-workers": (lambda: DataLoader(list(range(10)), batch_size=3, num_workers=1,
                                              persistent_workers=True), 1),
    "iterable-workers": (lambda: DataLoader(Stream(10), batch_size=3, num_workers=1), 1),
    "user-generator": (lambda: DataLoader(list(range(10)), batch_size=3, shuffle=True,
                                          num_workers=1,
                                          generator=torch.Generator().manual_seed(1)), 0),
}


def _batches(loader: Any) -> list[list[int]]:
    return [[int(i) for i in torch.as_tensor(b).reshape(-1).tolist()] for b in loader]


@pytest.mark.parametrize("name", LOADERS)
def test_passes_do_not_draw_from_the_global_rng(name: str) -> None:
    make, first_draws = LOADERS[name]
    loader = dl.shard(make(), ONE, start_batch=1)
    start = torch.get_rng_state()
    first = _batches(loader)
    after_first = torch.get_rng_state()
    assert torch.equal(after_first, _one_draw_after(start) if first_draws else start)
    epochs = []
    for epoch in (1, 2):
        epochs.append(_batches(loader))
        assert torch.equal(torch.get_rng_state(), after_first), epoch  # nothing drawn
    if first_draws and name != "workers" and name != "persistent-workers" \
            and name != "iterable-workers":  # shuffled: a new order every epoch
        assert epochs[0] != epochs[1] and epochs[0][1:] != first
    resumed = dl.shard(make(), ONE)
    resumed.load_state_dict(loader.state_dict() | {"epoch": 1, "start_batch": 1})
    torch.manual_seed(1234)  # any state: the resumed pass must not draw from it
    again = torch.get_rng_state()
    assert _batches(resumed) == epochs[0][1:]  # the order of epoch 1, from step 1
    assert torch.equal(torch.get_rng_state(), again)  # a resumed pass draws nothing either


def test_worker_seeds_repeat_by_seed_and_epoch_and_survive_a_resume() -> None:
    def run(seed: int) -> tuple[list[int], list[int], dict[str, int]]:
        torch.manual_seed(seed)
        loader = dl.shard(DataLoader(Noisy(), batch_size=2, num_workers=1), ONE)
        return _flat(loader), _flat(loader), loader.state_dict()

    epoch0, epoch1, state = run(5)
    assert run(5)[:2] == (epoch0, epoch1)
    assert run(6)[0] != epoch0 and epoch1 != epoch0
    torch.manual_seed(99)  # another RNG state: the worker seeds come from the saved seed
    resumed = dl.shard(DataLoader(Noisy(), batch_size=2, num_workers=1), ONE)
    resumed.load_state_dict(state | {"epoch": 1})
    assert _flat(resumed) == epoch1


# -- item 4: len() is the epoch; remaining is what is left ----------------------------------

def test_len_is_the_epoch_and_remaining_what_the_pass_has_left() -> None:
    loader = dl.shard(DataLoader(list(range(10)), batch_size=2), ONE, start_batch=2)
    assert (len(loader), loader.remaining) == (5, 3)
    it = iter(loader)
    counts = []
    for _ in it:
        counts.append((len(loader), loader.remaining, len(loader._inner_loader(2))))
    assert counts == [(5, 2, 3), (5, 1, 3), (5, 0, 3)]  # the inner sampler: this pass's 3
    assert (len(loader), loader.remaining) == (5, 5)  # after the pass: the next, whole one
    loader.load_state_dict({"epoch": 3, "start_batch": 4})
    assert (len(loader), loader.remaining) == (5, 1)
    assert _flat(loader) == [8, 9] and loader.position == (4, 4, True)
    loader.load_state_dict({"epoch": 0, "start_batch": 7})  # past the end: nothing left
    assert (len(loader), loader.remaining, _flat(loader)) == (5, 0, [])
    stream = dl.shard(DataLoader(Stream(30), batch_size=4), fake_env(1, 2), start_batch=1)
    assert (len(stream), stream.remaining) == (4, 3)
    unsized = dl.shard(DataLoader(Stream(5, sized=False), batch_size=2), ONE)
    with pytest.raises(ShardingError, match="must have a length"):
        unsized.remaining  # noqa: B018


def test_upstream_resume_arithmetic_after_load_state_dict() -> None:
    """Accelerate's examples: starting_epoch = resume_step // len(loader)."""
    per_epoch, epochs, stopped_at = 5, 3, 7
    reference = dl.shard(DataLoader(list(range(10)), batch_size=2, shuffle=True), ONE)
    torch.manual_seed(0)
    straight = [_flat(reference) for _ in range(epochs)]
    loader = dl.shard(DataLoader(list(range(10)), batch_size=2, shuffle=True), ONE)
    loader.load_state_dict({"epoch": 1, "start_batch": 2, "seed": reference.state_dict()["seed"]})
    resume_step = stopped_at
    starting_epoch = resume_step // len(loader)
    resume_step -= starting_epoch * len(loader)
    assert (starting_epoch, resume_step) == (1, 2)
    trained = []
    for epoch in range(starting_epoch, epochs):
        active = skip_first_batches(loader, resume_step) if epoch == starting_epoch else loader
        trained.append(_flat(active))
    assert len(trained[0]) + len(trained[1]) == (epochs * per_epoch - stopped_at) * 2
    assert trained == [straight[1][4:], straight[2]]


def test_accumulate_closes_the_last_window_of_a_resumed_pass() -> None:
    def micro_steps(loader: Any) -> list[tuple[int, int, bool]]:
        return [(int(b[0]), m.size, m.sync) for b, m in dl.accumulate(loader, steps=4)]

    straight = micro_steps(dl.shard(DataLoader(list(range(10)), batch_size=1), ONE))
    assert [s for _, s, _ in straight] == [4] * 8 + [2, 2]
    resumed = dl.shard(DataLoader(list(range(10)), batch_size=1), ONE)
    resumed.load_state_dict({"epoch": 0, "start_batch": 4})  # saved after optimizer step 1
    assert micro_steps(resumed) == straight[4:]  # windows [4-7], [8-9]: sizes 4 and 2
    skipped = skip_first_batches(dl.shard(DataLoader(list(range(10)), batch_size=1), ONE), 8)
    assert micro_steps(skipped) == straight[8:]
    one = dl.shard(DataLoader(list(range(10)), batch_size=1), ONE, start_batch=9)
    assert micro_steps(one) == [(9, 1, True)]


# -- item 8: skip_first_batches -------------------------------------------------------------

def test_skip_first_batches_skips_the_next_pass_only_and_shares_the_position() -> None:
    make = lambda: DataLoader(list(range(20)), batch_size=2, shuffle=True)  # noqa: E731
    torch.manual_seed(3)
    loader = dl.shard(make(), fake_env(0, 1))
    epoch0 = _flat(loader)
    view = skip_first_batches(loader, 6)
    assert isinstance(view, dl.data.ShardedLoader) and view is not loader
    assert (len(view), view.remaining, loader.remaining) == (10, 4, 4)
    state = torch.get_rng_state()
    epoch1_rest = _flat(view)
    assert torch.equal(state, torch.get_rng_state())
    reference = dl.shard(make(), fake_env(0, 1))
    reference.load_state_dict({"epoch": 1, "start_batch": 0, "seed": loader.state_dict()["seed"]})
    epoch1 = _flat(reference)
    assert epoch1_rest == epoch1[12:] and epoch1 != epoch0
    # The original goes on with epoch 2, whole; so does the view.
    assert loader.state_dict()["epoch"] == 2 and view.state_dict() == loader.state_dict()
    assert _flat(loader) == _flat(reference)
    assert len(_flat(view)) == 20


def test_skip_first_batches_mid_pass_state_and_unread_samples() -> None:
    class Counting(Dataset[int]):
        def __init__(self) -> None:
            self.read: list[int] = []

        def __len__(self) -> int:
            return 12

        def __getitem__(self, i: int) -> int:
            self.read.append(i)
            return i

    data = Counting()
    view = dl.shard(DataLoader(data, batch_size=2), fake_env(1, 2)).skip_first_batches(2)
    it = iter(view)
    assert next(it).tolist() == [10, 11]
    assert view.state_dict() == {"epoch": 0, "start_batch": 3}  # a save here resumes after it
    assert list(it) == [] and data.read == [10, 11]


def test_skip_first_batches_on_a_plain_dataloader() -> None:
    plain = DataLoader(list(range(10)), batch_size=3)
    view = skip_first_batches(plain, 2)
    assert [b.tolist() for b in view] == [[6, 7, 8], [9]]
    assert [b.tolist() for b in view] == [b.tolist() for b in plain]  # later passes whole
    meta = DataLoader(torch.zeros(4, 2), batch_size=2)
    assert next(iter(skip_first_batches(meta, 1))).device.type == "cpu"  # nowhere moved


@pytest.mark.parametrize("bad", [-1, 2.0, True, "3", None, 6])
def test_skip_first_batches_refuses_bad_counts(bad: object) -> None:
    loader = dl.shard(DataLoader(list(range(10)), batch_size=2), ONE)
    rule = "at most the epoch's 5 batches" if bad == 6 and bad is not True else "int >= 0"
    with pytest.raises(ShardingError, match=rule) as info:
        skip_first_batches(loader, bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value) and "skip_first_batches()" in str(info.value)
    assert loader.remaining == 5  # the loader was left as it was


def test_skip_first_batches_refuses_other_objects_and_allows_unsized_streams() -> None:
    with pytest.raises(ShardingError, match=r"must be a ShardedLoader .* but got list"):
        skip_first_batches([1, 2, 3], 1)
    unsized = dl.shard(DataLoader(Stream(7, sized=False), batch_size=2), ONE)
    assert _flat(skip_first_batches(unsized, 2)) == [4, 5, 6]
    assert _flat(skip_first_batches(unsized, 9)) == []  # no length to check: nothing left
