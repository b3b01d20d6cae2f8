"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def group() -> Iterator[None]:
    """A one-rank gloo group, as DDP, FSDP2 and DeepSpeed need one (left again after the test)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
