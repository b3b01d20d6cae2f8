"""The ``distlib test`` check of data sharding: coverage and gather_metrics deduplication."""

from __future__ import annotations

from typing import Any

from distlib.env import Env

__all__ = ["check_sharded_loader"]


def check_sharded_loader(env: Env) -> str:
    """Shard a map-style and an iterable dataset of an uneven length; gather every batch back.

    Each must give back exactly the dataset, in order: every sample once, padding dropped.

    Examples:
        >>> check_sharded_loader(Env())
        'map 7/7, iterable 7/7'

    Effects: collectives across all ranks (in the group the self-test joined).
    """
    from torch.utils.data import DataLoader, IterableDataset

    from distlib.collectives import gather_object
    from distlib.data import shard
    from distlib.metrics import gather_metrics

    class Stream(IterableDataset):  # type: ignore[type-arg]
        def __init__(self, n: int) -> None:
            self.n = n

        def __iter__(self) -> Any:
            return iter(range(self.n))

    n = 3 * env.world_size * 2 + 1  # never a whole number of global batches
    report = []
    datasets: tuple[tuple[str, Any], ...] = (("map", list(range(n))), ("iterable", Stream(n)))
    for name, dataset in datasets:
        loader = shard(DataLoader(dataset, batch_size=2), env)
        got: list[int] = []
        mine: list[int] = []
        for batch in loader:
            mine += batch.tolist()
            got += gather_metrics(batch, env, loader).tolist()
        assert got == list(range(n)), f"{name}: gathered {got}, expected 0..{n - 1}"
        covered = set(gather_object(mine, env))
        assert covered == set(range(n)), f"{name}: ranks read {sorted(covered)}"
        report.append(f"{name} {len(got)}/{n}")
    return ", ".join(report)
