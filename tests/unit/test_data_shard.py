"""shard() in one process: the loader of every rank of an N-rank Env, no process group."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler

import distlib as dl
from distlib._shard_plan import keep_index
from distlib.errors import CollectiveError, ShardingError
from distlib.testing import fake_env
from tests.models import Stream


class Counting(Dataset[int]):
    """A map-style dataset that records which samples were read."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.read: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.read.append(i)
        return i


def _passes(make: Any, world: int, **kw: Any) -> list[list[list[int]]]:
    out = []
    for rank in range(world):
        loader = dl.shard(make(), fake_env(rank, world), **kw)
        batches = [b.tolist() for b in loader]
        assert len(loader) == len(batches)
        out.append(batches)
    return out


def _dedup(make: Any, world: int, **kw: Any) -> list[int]:
    """What gather_metrics returns over a whole pass, computed rank by rank."""
    blocks, layout = [], []
    for rank in range(world):
        loader = dl.shard(make(), fake_env(rank, world), **kw)
        blocks.append([i for b in loader for i in b.tolist()])
        whole, steps = loader.metrics_layout()
        assert whole
        assert steps == layout[:len(steps)] or layout == steps[:len(layout)]
        layout = max(layout, steps, key=len)  # gather_metrics exchanges them when uneven
    gathered = [i for block in blocks for i in block]
    return [gathered[i] for i in keep_index(layout)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 3, 10, 17])
def test_map_dataset_batches_and_dedup(world: int, n: int) -> None:
    def make() -> DataLoader[int]:
        return DataLoader(list(range(n)), batch_size=2)

    passes = _passes(make, world)
    assert len({len(p) for p in passes}) == 1  # even batches
    if world == 1:
        assert passes[0] == [b.tolist() for b in make()]  # a single process is unchanged
    assert _dedup(make, world) == list(range(n))


def test_accelerate_example_batches() -> None:
    # 2 ranks, batches [[0,1,2,3],[4,5,6,7]]: whole batches, or halves with split_batches.
    def make() -> DataLoader[int]:
        return DataLoader(list(range(8)), batch_size=4)

    assert _passes(make, 2) == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    assert _passes(make, 2, split_batches=True) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]


def test_uneven_batches_without_even_batches() -> None:
    def make() -> DataLoader[int]:
        return DataLoader(list(range(10)), batch_size=4)

    assert _passes(make, 2, even_batches=False) == [[[0, 1, 2, 3], [8, 9]], [[4, 5, 6, 7]]]
    assert _passes(make, 2) == [[[0, 1, 2, 3], [8, 9, 0, 1]], [[4, 5, 6, 7], [2, 3, 4, 5]]]
    assert _dedup(make, 2, even_batches=False) == list(range(10))
    assert _dedup(make, 2, split_batches=True) == list(range(10))


def test_drop_last_keeps_only_full_steps() -> None:
    def make() -> DataLoader[int]:
        return DataLoader(list(range(10)), batch_size=2, drop_last=True)

    assert _passes(make, 2) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]


def test_shuffle_with_generator_is_disjoint_and_reshuffles_per_epoch() -> None:
    def make() -> DataLoader[int]:
        return DataLoader(list(range(20)), batch_size=3, shuffle=True,
                          generator=torch.Generator().manual_seed(7))

    loaders = [dl.shard(make(), fake_env(r, 2)) for r in range(2)]
    epochs = []
    for epoch in range(2):
        for loader in loaders:
            loader.set_epoch(epoch)
        seen = [[i for b in loader for i in b.tolist()] for loader in loaders]
        assert sorted(seen[0][:9] + seen[1][:9]) == sorted(set(seen[0][:9] + seen[1][:9]))
        dedup = keep_index(loaders[0].metrics_layout()[1])
        gathered = seen[0] + seen[1]
        assert sorted(gathered[i] for i in dedup) == list(range(20))
        epochs.append(gathered)
    assert epochs[0] != epochs[1]
    # Same epoch, fresh loaders: the same order (nothing depends on hidden state).
    again = dl.shard(make(), fake_env(0, 2))
    again.set_epoch(1)
    assert [i for b in again for i in b.tolist()] == epochs[1][:len(epochs[1]) // 2]


def test_start_batch_resumes_without_reading_skipped_samples() -> None:
    full = [b.tolist() for b in dl.shard(DataLoader(list(range(20)), batch_size=2), fake_env(1, 2))]
    data = Counting(20)
    loader = dl.shard(DataLoader(data, batch_size=2), fake_env(1, 2), start_batch=3)
    assert (len(loader), loader.remaining) == (len(full), len(full) - 3)
    assert [b.tolist() for b in loader] == full[3:]
    assert sorted(data.read) == sorted(i for b in full[3:] for i in b)
    assert loader.position.step == len(full) - 1 and loader.position.done
    assert [b.tolist() for b in loader] == full  # the next pass starts at 0
    assert (len(loader), loader.remaining) == (len(full), len(full))


def test_state_dict_round_trip() -> None:
    loader = dl.shard(DataLoader(list(range(12)), batch_size=2), fake_env(0, 2))
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert (state["epoch"], state["start_batch"], state["position"]) == (0, 2, 8)
    resumed = dl.shard(DataLoader(list(range(12)), batch_size=2), fake_env(0, 2))
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == [b.tolist() for b in it]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("split", [False, True])
def test_iterable_dataset_dedups_to_exactly_the_dataset(world: int, split: bool) -> None:
    batch = 4 if not split else 2 * world
    assert _dedup(lambda: DataLoader(Stream(30), batch_size=batch), world,
                  split_batches=split) == list(range(30))
    if world == 2 and not split:  # Accelerate's issue #3013: 32 rows; here exactly 30.
        assert len(_dedup(lambda: DataLoader(Stream(30, sized=False), batch_size=4), 2)) == 30


def test_iterable_start_batch_and_len() -> None:
    full = _passes(lambda: DataLoader(Stream(30), batch_size=4), 2)
    loader = dl.shard(DataLoader(Stream(30), batch_size=4), fake_env(1, 2), start_batch=2)
    assert (len(loader), loader.remaining) == (len(full[1]), len(full[1]) - 2)
    assert [b.tolist() for b in loader] == full[1][2:]
    assert [b.tolist() for b in loader] == full[1]


def test_workers_keep_batches_and_layout() -> None:
    base = _passes(lambda: DataLoader(list(range(23)), batch_size=3), 2)
    seen = []

    def init(worker_id: int) -> None:
        torch.manual_seed(worker_id)

    for rank in range(2):
        # A generator: without one the first pass agrees on a worker seed (a collective).
        src = DataLoader(list(range(23)), batch_size=3, num_workers=2, worker_init_fn=init,
                         persistent_workers=True, generator=torch.Generator().manual_seed(0))
        loader = dl.shard(src, fake_env(rank, 2))
        seen.append([b.tolist() for b in loader])
        assert loader._inner_loader(0).worker_init_fn is init
        workers = loader._inner_loader(0)._iterator
        assert workers is not None  # persistent workers stay up between passes
        assert [b.tolist() for b in loader] == seen[-1]
        assert loader._inner_loader(0)._iterator is workers
    assert seen == base
    # Each worker shards its own part of a worker-aware stream; dedup still gives the dataset.
    got = _dedup(lambda: DataLoader(WorkerStream(19), batch_size=2, num_workers=2,
                                    generator=torch.Generator().manual_seed(0)), 2)
    assert sorted(got) == list(range(19))


class WorkerStream(IterableDataset[int]):
    """Splits its samples between DataLoader workers, as torch asks iterable datasets to."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):  # type: ignore[no-untyped-def]
        info = torch.utils.data.get_worker_info()
        workers, me = (info.num_workers, info.id) if info else (1, 0)
        return iter(range(me, self.n, workers))


def test_variable_size_batch_sampler() -> None:
    class Buckets:
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter([[0], [1, 2], [3, 4, 5], [6]])

        def __len__(self) -> int:
            return 4

    def make() -> DataLoader[int]:
        return DataLoader(list(range(7)), batch_sampler=Buckets())

    assert _passes(make, 3) == [[[0], [6]], [[1, 2], [0]], [[3, 4, 5], [1, 2]]]
    assert _dedup(make, 3) == list(range(7))


def test_batch_sampler_as_sampler_and_no_auto_batching() -> None:
    sampler = BatchSampler(SequentialSampler(range(6)), batch_size=2, drop_last=False)
    assert _passes(lambda: DataLoader(torch.arange(6), sampler=sampler, batch_size=None), 3) == [
        [[0, 1]], [[2, 3]], [[4, 5]]]
    singles = [[int(x) for x in dl.shard(DataLoader(list(range(5)), batch_size=None),
                                         fake_env(r, 2))] for r in range(2)]
    assert singles == [[0, 2, 4], [1, 3, 0]]


def test_device_placement_and_structure() -> None:
    Pair = namedtuple("Pair", "x y")

    def collate(items: list[int]) -> dict[str, object]:
        t = torch.tensor(items)
        return {"pair": Pair(t, t * 2), "ids": [t], "name": "batch"}

    src = DataLoader(list(range(4)), batch_size=2, collate_fn=collate)
    (first, _) = list(dl.shard(src, fake_env(0, 1, device="meta")))
    assert first["pair"].x.device.type == "meta" and isinstance(first["pair"], Pair)
    assert first["ids"][0].device.type == "meta" and first["name"] == "batch"
    kept = list(dl.shard(src, fake_env(0, 1, device="meta"), device_placement=False))
    assert kept[0]["pair"].y.tolist() == [0, 2]


class _Moves:
    """An object that moves itself, as transformers' BatchEncoding: a leaf, moved by ``.to``."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def to(self, device: object) -> _Moves:
        return _Moves(str(device))


def test_device_placement_keeps_ordered_dicts_and_moves_objects_with_to() -> None:
    from collections import OrderedDict

    Pair = namedtuple("Pair", "x y")

    def collate(items: list[int]) -> object:
        t = torch.tensor(items)
        return OrderedDict([("z", Pair(t, [t])), ("enc", _Moves()), ("a", (t, "s"))])

    src = DataLoader(list(range(2)), batch_size=2, collate_fn=collate)
    (batch,) = list(dl.shard(src, fake_env(0, 1, device="meta")))
    assert type(batch) is OrderedDict and list(batch) == ["z", "enc", "a"]
    assert isinstance(batch["z"], Pair) and batch["z"].y[0].device.type == "meta"
    assert batch["enc"].device == "meta" and batch["a"][0].device.type == "meta"
    assert batch["a"][1] == "s"


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ShardingError, match="multiple of world_size"):
        dl.shard(DataLoader(list(range(8)), batch_size=3), fake_env(0, 2), split_batches=True)

    class Zero:
        batch_size = 0

        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter([])

    with pytest.raises(ShardingError, match="batch_size must be >= 1"):
        dl.shard(DataLoader(list(range(8)), batch_sampler=Zero()), fake_env(0, 2))
    unsized = dl.shard(DataLoader(Stream(5, sized=False), batch_size=2), fake_env(0, 2))
    with pytest.raises(ShardingError, match="must have a length"):
        len(unsized)
    assert [b.tolist() for b in list(unsized)] == [[0, 1], [4, 0]]  # len() is a TypeError too
    with pytest.raises(ShardingError, match="batch_size"):
        dl.shard(DataLoader(Stream(5), batch_size=None), fake_env(0, 2))


def test_gather_metrics_single_process() -> None:
    env = fake_env(0, 1)
    loader = dl.shard(DataLoader(list(range(5)), batch_size=2), env)
    with pytest.raises(CollectiveError, match="has not started"):
        dl.gather_metrics(torch.zeros(2), env, loader)
    got = [dl.gather_metrics({"p": b * 2, "t": [str(i) for i in b.tolist()]}, env, loader)
           for b in loader]
    assert [g["p"].tolist() for g in got] == [[0, 2], [4, 6], [8]]
    whole = dl.gather_metrics(torch.arange(5), env, loader)
    assert whole.tolist() == list(range(5))
    with pytest.raises(CollectiveError, match=r"pass rows \(5\)"):
        dl.gather_metrics(torch.arange(2), env, loader)
    with pytest.raises(CollectiveError, match=r"distlib\.shard"):
        dl.gather_metrics(torch.arange(2), env, DataLoader(list(range(5))))
    uneven = dl.shard(DataLoader(list(range(5)), batch_size=2), env, even_batches=False)
    for b in uneven:
        with pytest.raises(CollectiveError, match="once after the pass"):
            dl.gather_metrics(b, env, uneven)
    assert dl.gather_metrics(torch.arange(5), env, uneven).tolist() == list(range(5))


def test_resumed_shuffled_epoch_has_the_same_order() -> None:
    def make() -> DataLoader[int]:
        return DataLoader(list(range(20)), batch_size=2, shuffle=True)  # no generator

    first = dl.shard(make(), fake_env(0, 1))
    first.set_epoch(2)
    it = iter(first)
    seen = [next(it).tolist() for _ in range(3)]
    state = first.state_dict()
    rest = [b.tolist() for b in it]
    assert state["start_batch"] == 3 and "seed" in state
    resumed = dl.shard(make(), fake_env(0, 1))
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == rest
    assert sorted(i for b in seen + rest for i in b) == list(range(20))
