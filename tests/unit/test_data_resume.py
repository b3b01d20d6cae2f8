"""A sharded loader's randomness, length and resume in one process (issue 11, items 2-4, 8;
issue 17, parts 3 and 6: another data-parallel size, iterable datasets' own state, RNG).

The shuffle seed of a loader without a generator is one draw from the global torch RNG; after
that no pass draws from it (worker seeds come from a private generator), so a resumed run sees
the RNG stream of one that never stopped. ``len()`` is the epoch, ``remaining`` what is left.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
)

import distlib as dl
from distlib.checkpoint import rng
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
    state = view.state_dict()
    assert (state["epoch"], state["start_batch"], state["position"]) == (0, 3, 12)  # after it
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


# -- issue 17, part 3: resume at another data-parallel size ---------------------------------

def _shuffled(n: int = 20, batch: int = 2, **kw: Any) -> DataLoader[Any]:
    return DataLoader(list(range(n)), batch_size=batch, shuffle=True,
                      generator=torch.Generator().manual_seed(4), **kw)


def _saved_at(world: int, steps: int, make: Callable[[], Any] = _shuffled,
              **kw: Any) -> tuple[dict[str, Any], list[int]]:
    """Rank 0's state after ``steps`` steps at ``world`` ranks, and what all ranks read."""
    seen: list[int] = []
    states = []
    for rank in range(world):
        loader = dl.shard(make(), fake_env(rank, world), **kw)
        it = iter(loader)
        for _ in range(steps):
            seen.extend(_flat([next(it)]))
        states.append(loader.state_dict())
    return states[0], seen


def test_len_remaining_and_position_after_a_resume_at_another_size() -> None:
    state, before = _saved_at(2, 3)  # 12 of 20 samples read
    assert (state["position"], state["dp_size"], state["num_units"]) == (12, 2, 20)
    aligned = dl.shard(_shuffled(), fake_env(0, 3))  # G = 6: 12 is step 2 of a pass at 3
    aligned.load_state_dict(state)
    assert (len(aligned), aligned.remaining, aligned.state_dict()["start_batch"]) == (4, 2, 2)
    redealt = dl.shard(_shuffled(), fake_env(1, 4))  # G = 8: 12 is inside step 1
    redealt.load_state_dict(state)
    assert (len(redealt), redealt.remaining) == (3, 1)  # 8 samples left: one step of 8
    assert redealt.state_dict()["position"] == 12
    batch = next(iter(redealt))
    assert redealt.position == (0, 0, False)  # steps count from the re-dealt point
    after = redealt.state_dict()
    assert (after["start_sample"], after["start_batch"], after["position"]) == (12, 1, 20)
    rest = [i for r in range(4) for i in _flat(_resumed(state, r, 4))]
    assert sorted(before + rest) == list(range(20)) and batch.tolist() == rest[2:4]


def _resumed(state: dict[str, Any], rank: int, world: int, **kw: Any) -> Any:
    loader = dl.shard(_shuffled(), fake_env(rank, world), **kw)
    loader.load_state_dict(state)
    return loader


def test_same_size_resumes_as_saved_and_old_states_still_load() -> None:
    state, _ = _saved_at(2, 3)
    old = {"epoch": state["epoch"], "start_batch": 3, "seed": state["seed"]}
    straight = [_flat(_resumed(s, 1, 2)) for s in (state, old)]
    assert straight[0] == straight[1] == _flat(dl.shard(_shuffled(), fake_env(1, 2),
                                                        start_batch=3))
    with pytest.raises(ShardingError, match=r"older distlib\) must be loaded at the "
                                            r"data-parallel size it was saved at, but got 3 "
                                            r"now and 2 when saved"):
        _resumed(old | {"dp_size": 2}, 0, 3)  # load_state tells the loader the saved size


@pytest.mark.parametrize(("change", "rule"), [
    ({"epoch": -1}, r"state\['epoch'\] must be an int >= 0, but got -1"),
    ({"start_batch": "3"}, r"state\['start_batch'\] must be an int >= 0, but got '3'"),
    ({"position": True}, r"state\['position'\] must be an int >= 0, but got True"),
    ({"position": 1.5}, r"state\['position'\] must be an int >= 0, but got 1.5"),
    ({"dp_size": 0.5}, r"state\['dp_size'\] must be an int >= 0, but got 0.5"),
    ({"start_sample": -2}, r"state\['start_sample'\] must be an int >= 0, but got -2"),
    ({"unit": "batches"}, r"state\['unit'\] must be 'samples' .* but got 'batches'"),
    ({"num_units": 22}, r"as many samples as when saved, but got 20 now and 22 when saved"),
])
def test_load_state_dict_refuses_states_it_cannot_resume(change: dict[str, Any],
                                                         rule: str) -> None:
    state, _ = _saved_at(2, 3)
    loader = dl.shard(_shuffled(), fake_env(0, 2))
    with pytest.raises(ShardingError, match=rule) as info:
        loader.load_state_dict(state | change)
    assert "ShardedLoader.load_state_dict()" in str(info.value)
    assert loader.remaining == 5  # left as it was
    with pytest.raises(ShardingError, match=r"must be a dict .* but got list"):
        loader.load_state_dict([1, 2])  # type: ignore[arg-type]


def test_skip_first_batches_refuses_the_saving_jobs_step_count() -> None:
    state, _ = _saved_at(2, 3)
    loader = _resumed(state, 0, 3)  # resumes at step 2 of a pass at 3
    with pytest.raises(ShardingError, match=r"num_batches must be 2, the step load_state_dict "
                                            r"resumed at .* but got 3\. .*drop the"):
        skip_first_batches(loader, 3)  # Accelerate's recipe with the 2-rank job's steps
    assert _flat(skip_first_batches(loader, 2)) == _flat(_resumed(state, 0, 3))
    same = _resumed(state, 0, 2)
    assert _flat(skip_first_batches(same, 1)) == _flat(dl.shard(_shuffled(), fake_env(0, 2),
                                                                start_batch=1))


def test_padding_of_a_re_dealt_tail_is_flagged_for_gather_metrics() -> None:
    state, before = _saved_at(2, 2)  # 8 of 20 read; 12 left for 5 ranks of 2: G = 10
    real: list[int] = []
    for rank in range(5):
        loader = _resumed(state, rank, 5)
        for batch in loader:
            info = loader.metrics_layout()[1][-1]
            keep = max(0, min(len(batch), info.real - sum(info.rows[:rank])))
            real.extend(batch.tolist()[:keep])
        assert len(loader._at.infos) == 2 and loader._at.infos[1].real == 2
    assert sorted(before + real) == list(range(20))


# -- issue 17, part 6: iterable datasets that keep their own state ------------------------

class Resumable(IterableDataset[int]):
    """The integers below ``n``; its state is how many it has handed out; it logs reads."""

    def __init__(self, n: int) -> None:
        self.n, self.at, self.reads, self.resume_at = n, 0, [], 0

    def __iter__(self) -> Iterator[int]:
        start, self.resume_at = self.resume_at, 0
        for i in range(start, self.n):
            self.at = i + 1
            self.reads.append(i)
            yield i

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict[str, int]:
        return {"at": self.at}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = state["at"]


def test_a_stateful_iterable_dataset_resumes_without_replay_at_any_size() -> None:
    datasets, states, before = [], [], []
    for rank in range(2):
        datasets.append(Resumable(22))
        loader = dl.shard(DataLoader(datasets[-1], batch_size=2), fake_env(rank, 2))
        it = iter(loader)
        before += _flat([next(it), next(it), next(it)])
        states.append(loader.state_dict())
    assert states[0]["dataset"] == {"at": 12} and states[0]["position"] == 12
    for world in (1, 2, 3):
        after = []
        for rank in range(world):
            data = Resumable(22)
            loader = dl.shard(DataLoader(data, batch_size=2), fake_env(rank, world))
            loader.load_state_dict(states[0])
            assert loader.state_dict()["dataset"] == {"at": 12}  # handed on until read
            after += _flat(loader)
            assert data.reads == list(range(12, 22)), world  # nothing replayed
            assert _flat(loader) == _flat(dl.shard(DataLoader(Resumable(22), batch_size=2),
                                                   fake_env(rank, world)))  # whole again
        skipped = dl.shard(DataLoader(Resumable(22), batch_size=2), fake_env(0, world))
        skipped.load_state_dict(states[0])
        if world == 2:  # a step count of its own: the saved dataset state is not for it
            assert _flat(skip_first_batches(skipped, 4)) == _flat(
                dl.shard(DataLoader(Stream(22), batch_size=2), fake_env(0, 2), start_batch=4))
        padding = [12, 13] if world > 1 else []  # 10 left for G = 4 or 6: 2 looped back
        assert sorted(before + after) == sorted([*range(22), *padding])


def test_an_iterable_dataset_without_state_or_with_workers_is_replayed() -> None:
    for make in (lambda: DataLoader(Stream(22), batch_size=2),
                 lambda: DataLoader(Resumable(22), batch_size=2, num_workers=1,
                                    generator=torch.Generator().manual_seed(0))):
        state = None
        before = []
        for rank in range(2):
            loader = dl.shard(make(), fake_env(rank, 2))
            it = iter(loader)
            before += _flat([next(it), next(it), next(it)])
            state = state or loader.state_dict()
        assert state is not None and "dataset" not in state and state["position"] == 12
        after = []
        for rank in range(3):
            loader = dl.shard(make(), fake_env(rank, 3), even_batches=False)
            loader.load_state_dict(state)
            after += _flat(loader)
        assert sorted(before + after) == list(range(22))


def test_torchdata_stateful_dataloader_is_sharded_and_its_own_state_refused() -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader",
                                   reason="torchdata is an optional integration")
    data = Resumable(12)
    loader = dl.shard(stateful.StatefulDataLoader(data, batch_size=2), fake_env(1, 2))
    it = iter(loader)
    assert next(it).tolist() == [2, 3]
    state = loader.state_dict()
    assert state["dataset"] == {"at": 4}
    resumed = dl.shard(stateful.StatefulDataLoader(Resumable(12), batch_size=2), ONE)
    resumed.load_state_dict(state)
    assert _flat(resumed) == list(range(4, 12))
    raw = stateful.StatefulDataLoader(Resumable(12), batch_size=2)
    raw.load_state_dict(raw.state_dict())
    with pytest.raises(ShardingError, match="StatefulDataLoader must not hold a state loaded "
                                            "with its own load_state_dict"):
        dl.shard(raw, ONE)


# -- issue 17, part 3: RNG at another world size --------------------------------------------

def test_rng_at_another_world_size_is_derived_per_rank(tmp_path: pathlib.Path) -> None:
    import random

    (tmp_path / "rng").mkdir()
    for rank in range(2):
        torch.manual_seed(10 + rank)
        random.seed(10 + rank)
        rng.save_rng_state(tmp_path, rank)

    def draws(rank: int, world: int) -> tuple[float, float]:
        torch.manual_seed(999)  # whatever the state before: load_rng_state sets it
        random.seed(999)
        rng.load_rng_state(tmp_path, fake_env(rank, world), {"world_size": 2})
        return torch.rand(()).item(), random.random()

    torch.manual_seed(11)
    random.seed(11)
    own = (torch.rand(()).item(), random.random())
    assert draws(1, 2) == own  # at the saving job's size: its own saved state
    three = [draws(r, 3) for r in range(3)]
    assert three == [draws(r, 3) for r in range(3)]  # the same on every resume
    assert len(set(three)) == 3 and draws(0, 2) not in three  # one stream per rank
    assert draws(2, 5) == three[2]  # from the checkpoint and the new rank alone
    with pytest.raises(dl.errors.CheckpointError, match=r"load_state\(\): .*rank0\.pt must"):
        (tmp_path / "rng" / "rank0.pt").write_bytes(b"not a torch file")
        rng.load_rng_state(tmp_path, fake_env(0, 3), {"world_size": 2})
