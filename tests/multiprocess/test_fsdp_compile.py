"""`wrap(..., compile=)` under FSDP2 compiles each unit before `fully_shard` (torchtitan's order:
TP -> activation checkpointing -> compile -> FSDP) and trains exactly as without compile."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

import distlib as dl
from distlib.testing import spawn
from distlib.topology import Mesh
from tests.models import net

pytestmark = pytest.mark.multiprocess

MLP_PLAN = {"0.fc": "colwise", "1.fc": "rowwise"}


def _losses(env: dl.Env, compiled: bool, tp: int) -> dict[str, Any]:
    env = dataclasses.replace(env, mesh=Mesh(dp_shard=-1, tp=tp))
    model = net(8, 16, 8, 4, seed=0)  # Block(8, 16), Block(16, 8), Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    extra: dict[str, Any] = {"tp_plan": MLP_PLAN} if tp > 1 else {}
    model, optimizer = dl.wrap(model, dl.FSDP(wrap_classes=("Block",)), env=env,
                               optimizer=optimizer,
                               compile={"backend": "eager"} if compiled else False, **extra)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(4):
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        dl.backward(loss, model)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    units = [m for m in model.modules() if type(m).__name__.startswith("FSDPBlock")
             or type(m).__name__ == "Block"]
    return {"losses": losses, "is_fsdp": isinstance(model, FSDPModule),
            "compiled_units": sum(getattr(m, "_compiled_call_impl", None) is not None
                                  for m in units),
            "units": len(units)}


def _scenarios(env: dl.Env) -> dict[str, Any]:
    return {f"{tp}-{c}": _losses(env, c, tp) for tp in (1, 2) for c in (False, True)}


def test_fsdp_compiles_each_unit_before_sharding_and_trains_the_same() -> None:
    out = spawn(_scenarios, world_size=4, timeout_s=240).returns
    for rank, got in out.items():
        for tp in (1, 2):
            plain, compiled = got[f"{tp}-False"], got[f"{tp}-True"]
            assert compiled["is_fsdp"], (rank, tp)  # the FSDP module itself, not an OptimizedModule
            assert compiled["units"] == 2 and compiled["compiled_units"] == 2, (rank, tp, compiled)
            assert plain["compiled_units"] == 0
            assert compiled["losses"] == pytest.approx(plain["losses"], rel=1e-5), (rank, tp)
