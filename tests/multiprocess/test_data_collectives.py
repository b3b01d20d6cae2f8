"""shard(), gather_metrics() and the collectives in real 2-rank gloo jobs, vs one process."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from distlib.testing import spawn

pytestmark = pytest.mark.multiprocess


def _data_scenarios(env: Any) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    import distlib as dl
    from distlib.errors import CollectiveError

    class Stream(IterableDataset):  # type: ignore[type-arg]
        def __init__(self, n: int) -> None:
            self.n = n

        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(range(self.n))

    def per_batch(loader: Any, fn: Any = lambda b: b) -> list[Any]:
        rows: list[Any] = []
        for batch in loader:
            rows.extend(dl.gather_metrics(fn(batch), env, loader).tolist())
        return rows

    def whole_pass(loader: Any) -> list[Any]:
        batches = list(loader)
        mine = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.long)
        return dl.gather_metrics(mine, env, loader).tolist()

    out: dict[str, Any] = {}
    out["map"] = per_batch(dl.shard(DataLoader(list(range(23)), batch_size=4), env))
    out["map_len"] = len(dl.shard(DataLoader(list(range(23)), batch_size=4), env))
    out["map_whole"] = whole_pass(dl.shard(DataLoader(list(range(23)), batch_size=4), env))
    out["split"] = per_batch(dl.shard(DataLoader(list(range(23)), batch_size=4), env,
                                      split_batches=True))
    out["iterable"] = per_batch(dl.shard(DataLoader(Stream(30), batch_size=4), env))
    out["iterable_whole"] = whole_pass(dl.shard(DataLoader(Stream(30), batch_size=4), env))
    out["workers"] = per_batch(dl.shard(DataLoader(list(range(21)), batch_size=3,
                                                   num_workers=2), env))
    uneven = dl.shard(DataLoader(list(range(10)), batch_size=4), env, even_batches=False)
    out["uneven_len"] = len(uneven)
    out["uneven_whole"] = whole_pass(uneven)
    try:
        for batch in uneven:
            dl.gather_metrics(batch, env, uneven)
    except CollectiveError as exc:
        out["uneven_error"] = str(exc)
    class Buckets:  # a batch sampler with variable-size batches and no batch_size
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter([[0], [1, 2], [3, 4, 5], [6], [7, 8]])

        def __len__(self) -> int:
            return 5

    out["variable"] = per_batch(dl.shard(DataLoader(list(range(9)), batch_sampler=Buckets()),
                                         env))
    out["iterable_uneven"] = whole_pass(dl.shard(DataLoader(Stream(13), batch_size=4), env,
                                                 even_batches=False))
    shuffled = dl.shard(DataLoader(list(range(17)), batch_size=2, shuffle=True), env)
    out["shuffled"] = sorted(whole_pass(shuffled))
    nested = dl.shard(DataLoader(list(range(11)), batch_size=3), env)
    texts, preds, pairs = [], [], []
    for batch in nested:
        got = dl.gather_metrics({"pred": torch.stack([batch, -batch], 1).float(),
                                 "text": [f"s{i}" for i in batch.tolist()],
                                 "pair": (batch * 10,)}, env, nested)
        texts += got["text"]
        preds += got["pred"][:, 1].tolist()
        pairs += got["pair"][0].tolist()
    out["nested"] = (texts, preds, pairs)
    return out


def test_sharded_loaders_and_gather_metrics_in_two_ranks() -> None:
    result = spawn(_data_scenarios, world_size=2, timeout_s=240)
    for rank in (0, 1):
        got = result[rank]
        assert got["map"] == list(range(23))
        assert got["map_whole"] == list(range(23))
        assert got["map_len"] == 3  # ceil(23 / 4) = 6 batches, 3 steps, padding on rank 1
        assert got["split"] == list(range(23))
        assert got["iterable"] == list(range(30))  # Accelerate's issue #3013 gives 32
        assert got["iterable_whole"] == list(range(30))
        assert got["workers"] == list(range(21))
        assert got["uneven_whole"] == list(range(10))
        assert "once after the pass" in got["uneven_error"]
        assert got["shuffled"] == list(range(17))
        assert got["variable"] == list(range(9))  # ranks' rows differ: padded, then unpadded
        assert got["iterable_uneven"] == list(range(13))
        assert got["nested"] == ([f"s{i}" for i in range(11)], [-float(i) for i in range(11)],
                                 [10 * i for i in range(11)])
    assert [result[r]["uneven_len"] for r in (0, 1)] == [2, 1]


def _collective_scenarios(env: Any) -> dict[str, Any]:
    import collections

    import torch

    import distlib as dl
    from distlib.errors import CollectiveError

    r = env.rank
    x = {"a": torch.tensor([r, r + 1.0]), "b": [torch.full((2, 2), float(r)), (torch.tensor(r),)]}
    out: dict[str, Any] = {"debug": env.debug, "check": env.check_collectives}
    g = dl.gather(x, env)
    out["gather"] = (g["a"].tolist(), g["b"][0].tolist(), g["b"][1][0].tolist())
    out["gather_object"] = (dl.gather_object([f"r{r}"], env), dl.gather_object({"r": r}, env))
    out["reduce"] = {op: dl.reduce(x["a"], env, op=op).tolist()
                     for op in ("sum", "mean", "max", "min")}
    out["input_unchanged"] = x["a"].tolist()
    out["broadcast"] = dl.broadcast({"t": torch.tensor([r * 5.0])}, env, src=1)["t"].tolist()
    out["broadcast_object"] = dl.broadcast_object({"from": r}, env)
    padded = dl.pad_across_processes(torch.ones(r + 1, 2), env, dim=0, pad_index=-1)
    first = dl.pad_across_processes(torch.ones(2, r + 1), env, dim=1, pad_first=True)
    out["pad"] = (padded.tolist(), first.tolist())
    with dl.split_between_processes(list(range(5)), env, apply_padding=True) as mine:
        out["split"] = dl.gather_object(mine, env)
    order = []
    with dl.main_process_first(env):
        order.append(("body", r))
    dl.barrier(env)
    out["order"] = dl.gather_object(order, env)
    Pair = collections.namedtuple("Pair", "t rows")
    tree = collections.OrderedDict(z=Pair(torch.tensor([float(r)]), [f"r{r}"]), a=torch.ones(1))
    kinds = {}
    for name, fn in (("gather", dl.gather), ("reduce", dl.reduce),
                     ("pad", dl.pad_across_processes)):
        got = fn(collections.OrderedDict(z=Pair(tree["z"].t, [tree["a"]]), a=tree["a"]), env)
        kinds[name] = (type(got).__name__, list(got), type(got["z"]).__name__,
                       got["z"].t.tolist())
    loader = dl.shard(torch.utils.data.DataLoader(list(range(3)), batch_size=1), env)
    seen = [dl.gather_metrics(collections.OrderedDict(z=Pair(b, [f"s{int(b)}"])), env, loader)
            for b in loader]
    kinds["gather_metrics"] = [(type(g).__name__, type(g["z"]).__name__, g["z"].t.tolist(),
                                g["z"].rows) for g in seen]
    out["kinds"] = kinds
    try:
        dl.gather(torch.zeros(r + 1), env)
    except CollectiveError as exc:
        out["mismatch"] = str(exc)
    return out


def test_collectives_match_single_process_math() -> None:
    result = spawn(_collective_scenarios, world_size=2, timeout_s=240)  # checked by default
    a = [torch.tensor([r, r + 1.0]) for r in (0, 1)]
    for rank in (0, 1):
        got = result[rank]
        assert got["debug"] is False and got["check"] is True
        assert got["gather"] == (torch.cat(a).tolist(), [[0.0, 0.0]] * 2 + [[1.0, 1.0]] * 2,
                                 [0, 1])
        assert got["gather_object"] == (["r0", "r1"], [{"r": 0}, {"r": 1}])
        assert got["reduce"] == {"sum": (a[0] + a[1]).tolist(),
                                 "mean": ((a[0] + a[1]) / 2).tolist(),
                                 "max": torch.maximum(a[0], a[1]).tolist(),
                                 "min": torch.minimum(a[0], a[1]).tolist()}
        assert got["input_unchanged"] == a[rank].tolist()
        assert got["broadcast"] == [5.0]
        assert got["broadcast_object"] == {"from": 0}
        rows = [[1.0, 1.0]] * (rank + 1) + [[-1.0, -1.0]] * (1 - rank)
        cols = [[0.0] * (1 - rank) + [1.0] * (rank + 1)] * 2
        assert got["pad"] == (rows, cols)
        assert got["split"] == [0, 1, 2, 3, 4, 4]
        assert got["order"] == [("body", 0), ("body", 1)]
        assert "rank 1 passed" in got["mismatch"] and "gather()" in got["mismatch"]
        assert got["kinds"] == {  # containers keep their type through every collective
            "gather": ("OrderedDict", ["z", "a"], "Pair", [0.0, 1.0]),
            "reduce": ("OrderedDict", ["z", "a"], "Pair", [0.5]),
            "pad": ("OrderedDict", ["z", "a"], "Pair", [float(rank)]),
            "gather_metrics": [("OrderedDict", "Pair", [0, 1], ["s0", "s1"]),
                               ("OrderedDict", "Pair", [2], ["s2"])]}
