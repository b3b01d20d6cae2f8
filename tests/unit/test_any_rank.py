"""any_rank() in one process: bool(flag), without joining any process group."""

from __future__ import annotations

import sys

import pytest
import torch

import distlib as dl
from distlib.env import Env


@pytest.mark.parametrize(("flag", "expected"), [
    (True, True), (False, False), (1, True), (0, False), (None, False),
    (torch.tensor(True), True), (torch.tensor(0.0), False), (torch.tensor([3]), True),
])
def test_one_process_is_bool_of_the_flag(flag: object, expected: bool) -> None:
    got = dl.any_rank(flag, Env())
    assert got is expected
    dist = sys.modules.get("torch.distributed")
    assert dist is None or not dist.is_initialized()
