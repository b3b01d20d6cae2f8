"""The precision casts walk batches and outputs with the one walker: containers keep their type."""

from __future__ import annotations

import collections
import pickle
from typing import Any, NamedTuple

import torch

from distlib.precision import AutocastForward, _cast_floats, to_float32


class Batch(NamedTuple):
    x: torch.Tensor
    ids: torch.Tensor


class Record(dict):  # type: ignore[type-arg]
    """A dict subclass, as a user's output type might be."""


def _forward(batch: Batch, *, extra: collections.OrderedDict[str, torch.Tensor]) -> Any:
    return {"seen": (batch.x.dtype, batch.ids.dtype, extra["m"].dtype),
            "out": Batch(batch.x * 2, batch.ids)}


def test_cast_inputs_takes_a_namedtuple_batch() -> None:
    """DeepSpeed's path (inputs cast, no autocast): a namedtuple batch was a TypeError."""
    step = AutocastForward(_forward, "cpu", torch.bfloat16, cast_inputs=True)
    extra = collections.OrderedDict(m=torch.ones(1))
    out = step(Batch(torch.ones(2), torch.arange(2)), extra=extra)
    assert out["seen"] == (torch.bfloat16, torch.int64, torch.bfloat16)
    assert isinstance(out["out"], Batch)
    assert out["out"].x.dtype == torch.float32 and out["out"].ids.dtype == torch.int64
    assert extra["m"].dtype == torch.float32  # the caller's values are not changed
    assert pickle.loads(pickle.dumps(step)).cast_inputs is True


def test_casts_keep_namedtuples_ordered_dicts_and_dict_subclasses() -> None:
    half = torch.ones(1, dtype=torch.float16)
    tree = {"nt": Batch(half, torch.arange(1)),
            "od": collections.OrderedDict([("b", half), ("a", [half, "tag"])]),
            "rec": Record(v=half)}
    for out, dtype in ((to_float32(tree), torch.float32),
                       (_cast_floats(tree, torch.bfloat16), torch.bfloat16)):
        assert isinstance(out["nt"], Batch) and out["nt"].x.dtype == dtype
        assert out["nt"].ids.dtype == torch.int64
        assert type(out["od"]) is collections.OrderedDict and list(out["od"]) == ["b", "a"]
        assert out["od"]["a"][0].dtype == dtype and out["od"]["a"][1] == "tag"
        assert type(out["rec"]) is Record and out["rec"]["v"].dtype == dtype
    assert tree["od"]["b"].dtype == torch.float16  # the input is not modified


def test_to_float32_leaves_fp32_tensors_and_other_values_alone() -> None:
    t = torch.ones(1)
    out = to_float32([t, 3, None, ("s",)])
    assert out[0] is t and out[1:] == [3, None, ("s",)]
