"""Mismatched collectives in real 2-rank gloo jobs: named errors by default, opt-outs honoured.

Without the agreement check these calls return wrong values and exit 0 (broadcast of
different shapes leaves rank 1 with its own tensor, a dtype mismatch gives garbage, a reduce
with different ops gives different results on each rank) or fail later with a backend error.
With the check (the default) every rank raises `CollectiveError` naming the rank that
disagrees and what each passed, and the group stays usable.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from distlib.testing import spawn

pytestmark = pytest.mark.multiprocess


def _mismatches(env: Any) -> dict[str, Any]:
    import time

    import torch
    from torch.utils.data import DataLoader

    import distlib as dl
    from distlib.errors import CollectiveError

    r = env.rank
    loader = dl.shard(DataLoader(list(range(8)), batch_size=2), env)
    batch = next(iter(loader))
    cases = {
        "broadcast_shape": lambda e, **k: dl.broadcast(torch.full((r + 1,), 7.0 + r), e, **k),
        "broadcast_dtype": lambda e, **k: dl.broadcast(
            torch.ones(2, dtype=torch.float32 if r == 0 else torch.float64), e, **k),
        "broadcast_src": lambda e, **k: dl.broadcast(torch.ones(2), e, src=r, **k),
        "reduce_shape": lambda e, **k: dl.reduce(torch.ones(2 + r), e, op="sum", **k),
        "reduce_op": lambda e, **k: dl.reduce(torch.ones(2) * (r + 1), e,
                                              op="mean" if r == 0 else "sum", **k),
        "gather_rows": lambda e, **k: dl.gather(torch.ones(1 + r), e, **k),
        "gather_keys": lambda e, **k: dl.gather({"a" if r == 0 else "b": torch.ones(1)}, e, **k),
        "gather_metrics_features": lambda e, **k: dl.gather_metrics(
            torch.zeros(len(batch), 3 + r), e, loader, **k),
        "pad_dim": lambda e, **k: dl.pad_across_processes(torch.ones(2, 2), e, dim=r, **k),
        "barrier_vs_gather": lambda e, **k: (dl.barrier(e, **k) if r == 0
                                             else dl.gather(torch.ones(1), e, **k)),
        "objects_vs_broadcast_object": lambda e, **k: (
            dl.gather_object([r], e, **k) if r == 0 else dl.broadcast_object(r, e, **k)),
    }
    out: dict[str, Any] = {}
    for name, call in cases.items():
        start = time.perf_counter()
        try:
            call(env)
            out[name] = "no error"
        except CollectiveError as error:
            out[name] = str(error)
        out[f"{name} seconds"] = time.perf_counter() - start
    out["after"] = dl.reduce(torch.ones(2), env, op="sum").tolist()  # the group still works
    # The opt-outs really skip the check: the old, silently wrong broadcast comes back.
    quiet = dataclasses.replace(env, check_collectives=False)
    out["check=False"] = cases["broadcast_shape"](env, check=False).tolist()
    out["env opt-out"] = cases["broadcast_shape"](quiet).tolist()
    out["reduce_op unchecked"] = cases["reduce_op"](quiet).tolist()
    try:  # debug mode keeps the check whatever check= says
        cases["broadcast_shape"](dataclasses.replace(quiet, debug=True), check=False)
        out["debug"] = "no error"
    except CollectiveError as error:
        out["debug"] = str(error)
    out["check=True on an opted-out Env"] = "no error"
    try:
        cases["reduce_shape"](quiet, check=True)
    except CollectiveError as error:
        out["check=True on an opted-out Env"] = str(error)
    out["final"] = dl.gather(torch.tensor([r]), env).tolist()
    return out


def test_mismatched_collectives_name_the_rank_and_opt_outs_skip_the_check() -> None:
    result = spawn(_mismatches, world_size=2, timeout_s=120)
    expect = {  # what rank 1 passed, as the message shows it, against rank 0
        "broadcast_shape": ("broadcast(src=0) of float32[2]", "broadcast(src=0) of float32[1]"),
        "broadcast_dtype": ("broadcast(src=0) of float64[2]", "broadcast(src=0) of float32[2]"),
        "broadcast_src": ("broadcast(src=1) of float32[2]", "broadcast(src=0) of float32[2]"),
        "reduce_shape": ("reduce(op='sum') of float32[3]", "reduce(op='sum') of float32[2]"),
        "reduce_op": ("reduce(op='sum') of float32[2]", "reduce(op='mean') of float32[2]"),
        "gather_rows": ("gather() of float32[2]", "gather() of float32[1]"),
        "gather_keys": ("gather() of {'b': float32[1]}", "gather() of {'a': float32[1]}"),
        "gather_metrics_features": ("gather_metrics() of float32[*, 4]",
                                    "gather_metrics() of float32[*, 3]"),
        "pad_dim": ("pad_across_processes(dim=1) of float32[2, *]",
                    "pad_across_processes(dim=0) of float32[*, 2]"),
        "barrier_vs_gather": ("gather() of float32[1]", "barrier()"),
        "objects_vs_broadcast_object": ("broadcast_object(src=0)", "gather_object()"),
    }
    for rank in (0, 1):
        got = result[rank]
        for name, (theirs, ours) in expect.items():
            message = got[name]
            assert "rank 1 passed " + theirs in message, (name, message)
            assert "while rank 0 passed " + ours in message, (name, message)
            assert "must make the same call" in message
            assert got[f"{name} seconds"] < 5.0, (name, got[f"{name} seconds"])
        assert got["after"] == [2.0, 2.0]
        assert got["debug"] == result[0]["broadcast_shape"]
        assert "reduce(op='sum') of float32[3]" in got["check=True on an opted-out Env"]
        assert got["final"] == [0, 1]
    # Unchecked, the mismatch is silent: rank 1 keeps a tensor rank 0 never sent, and the
    # two ranks hold different "reduced" values. This is what check=False buys in a hot loop.
    assert result[0]["check=False"] == [7.0] and result[1]["check=False"] == [7.0, 8.0]
    assert result[1]["env opt-out"] == [7.0, 8.0]
    assert result[0]["reduce_op unchecked"] != result[1]["reduce_op unchecked"]
