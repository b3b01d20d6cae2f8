"""runtime: single-process Envs join nothing; an existing group that disagrees is an error."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from distlib import runtime
from distlib.env import Env
from distlib.errors import RuntimeStateError
from distlib.testing import fake_env


def test_single_process_env_joins_nothing() -> None:
    with runtime.process_group(Env()) as env:
        assert env.world_size == 1
        assert not runtime.is_initialized()
    runtime.initialize(Env())
    assert not runtime.is_initialized()


@pytest.mark.usefixtures("group")
def test_disagreeing_group_is_an_error_not_a_hang() -> None:
    env = fake_env(1, 2)
    with pytest.raises(RuntimeStateError, match=r"Env\(rank=1, world_size=2\) and a group with "
                       r"rank=0, world_size=1"):
        runtime.initialize(env)
    with pytest.raises(RuntimeStateError), runtime.process_group(env):
        pass
    assert runtime.is_initialized()  # a group it did not join is left alone


@pytest.mark.usefixtures("group")
def test_process_group_leaves_a_group_it_did_not_join_alone() -> None:
    with runtime.process_group(Env()):
        pass
    assert runtime.is_initialized()
    runtime.shutdown()
    assert not runtime.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def test_env_with_another_backend_than_the_joined_group_is_an_error() -> None:
    # A group of two ranks in this process: torch's in-process fake backend stands in for the
    # second rank. The Env agrees on rank and world size but says 'gloo'; the group is 'fake'.
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        env = fake_env(0, 2)
        with pytest.raises(RuntimeStateError, match=r"backend must match the process group "
                           r"already joined, but got Env\(backend='gloo'\) and a group with "
                           r"backend 'fake'\. Use the same device kind in both"):
            runtime.initialize(env)
        with pytest.raises(RuntimeStateError, match="backend"), runtime.process_group(env):
            pass
        assert runtime.is_initialized()  # a group it did not join is left alone
    finally:
        dist.destroy_process_group()
