"""The dispatch hooks move nested inputs with the one walker: containers keep their type."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, NamedTuple

import torch

from distlib.big_model import hooks
from distlib.big_model.placement import dispatch


class Batch(NamedTuple):
    x: torch.Tensor
    tag: str


def test_inputs_are_moved_with_their_containers() -> None:
    t = torch.ones(2)
    meta = torch.device("meta")
    tree = collections.OrderedDict(b=Batch(t, "id"), a=[t, (t,)], n=3)
    out = hooks._move(tree, meta)
    assert type(out) is collections.OrderedDict and list(out) == ["b", "a", "n"]
    assert isinstance(out["b"], Batch) and out["b"].x.device == meta and out["b"].tag == "id"
    assert out["a"][1][0].device == meta and out["n"] == 3
    assert hooks._move(t, torch.device("cpu")) is t  # already there: not copied


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(2, 2)
        self.second = torch.nn.Linear(2, 2)

    def forward(self, batch: Batch, extra: collections.OrderedDict[str, Any]) -> Any:
        seen = (type(batch).__name__, type(extra).__name__)
        return collections.OrderedDict(y=self.second(self.first(batch.x) + extra["shift"]),
                                       seen=seen)


def test_a_dispatched_model_takes_namedtuples_and_ordered_dicts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _Net()
    x = Batch(torch.randn(3, 2), "b")
    extra = collections.OrderedDict(shift=torch.ones(3, 2))
    expected = net(x, extra)["y"]
    dispatch(net, {"first": "cpu", "second": "disk"}, offload_folder=tmp_path)
    out = net(x, extra=extra)
    assert type(out) is collections.OrderedDict and out["seen"] == ("Batch", "OrderedDict")
    assert torch.allclose(out["y"], expected)
