"""torch.distributed.checkpoint planners that count the bytes each rank writes or reads.

DCP's default planners, plus a `ByteBar`: a rank's total is known when its final plan is
(``finish_plan``: under DDP the ranks share the replicated tensors, so the main rank's bar
counts its own part); a tensor counts once its data is handed to the writer
(``resolve_data``) or copied into its destination (``commit_tensor``), one update per tensor.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, SavePlan, WriteItem

from distlib._progress import ByteBar
from distlib._safe_unpickle import read_dcp

__all__ = ["CountingLoadPlanner", "CountingSavePlanner", "read_dcp_counting"]


def _write_bytes(item: WriteItem) -> int:
    return item.tensor_storage_size() or 0  # None for a BYTE_IO entry (param_groups, ...)


class CountingSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, counting this rank's tensor bytes into ``bar``."""

    def __init__(self, bar: ByteBar) -> None:
        super().__init__()
        self.bar = bar

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        plan = super().finish_plan(new_plan)
        if self.bar.shown:
            self.bar.grow(sum(_write_bytes(item) for item in plan.items))
        return plan

    def resolve_data(self, write_item: WriteItem) -> Any:
        data = super().resolve_data(write_item)
        self.bar.update(_write_bytes(write_item))
        return data


class CountingLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, counting the tensor bytes this rank reads into ``bar``."""

    def __init__(self, bar: ByteBar) -> None:
        super().__init__()
        self.bar = bar

    def finish_plan(self, new_plan: LoadPlan) -> LoadPlan:
        plan = super().finish_plan(new_plan)
        if self.bar.shown:
            self.bar.grow(sum(item.lengths.numel() * self.lookup_tensor(item.dest_index).element_size()
                              for item in plan.items if item.type != LoadItemType.BYTE_IO))
        return plan

    def commit_tensor(self, read_item: Any, tensor: torch.Tensor) -> None:
        super().commit_tensor(read_item, tensor)
        self.bar.update(tensor.numel() * tensor.element_size())


def read_dcp_counting(state: dict[str, Any], folder: str | os.PathLike[str], *, no_dist: bool,
                      call: str, bar: ByteBar) -> None:
    """`distlib._safe_unpickle.read_dcp` with a `CountingLoadPlanner` counting into ``bar``.

    Raises:
        CheckpointError: as ``read_dcp`` (an unsafe, damaged or incomplete file, named).

    Effects: reads the folder; fills ``state`` in place (collective unless ``no_dist``);
    updates ``bar``.
    """
    read_dcp(state, folder, no_dist=no_dist, call=call, planner=CountingLoadPlanner(bar))
