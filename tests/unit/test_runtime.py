"""runtime: single-process Envs join nothing; an existing group that disagrees is an error."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from distlib import runtime
from distlib.env import Env
from distlib.errors import RuntimeStateError


def test_single_process_env_joins_nothing() -> None:
    with runtime.process_group(Env()) as env:
        assert env.world_size == 1
        assert not runtime.is_initialized()
    runtime.initialize(Env())
    assert not runtime.is_initialized()


@pytest.fixture
def group_of_one() -> object:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.usefixtures("group_of_one")
def test_disagreeing_group_is_an_error_not_a_hang() -> None:
    env = Env(rank=1, world_size=2, local_rank=1, local_world_size=2)
    with pytest.raises(RuntimeStateError, match=r"Env\(rank=1, world_size=2\) and a group with "
                       r"rank=0, world_size=1"):
        runtime.initialize(env)
    with pytest.raises(RuntimeStateError), runtime.process_group(env):
        pass
    assert runtime.is_initialized()  # a group it did not join is left alone


@pytest.mark.usefixtures("group_of_one")
def test_process_group_leaves_a_group_it_did_not_join_alone() -> None:
    with runtime.process_group(Env()):
        pass
    assert runtime.is_initialized()
    runtime.shutdown()
    assert not runtime.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
