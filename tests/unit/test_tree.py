"""The one walker (`distlib._tree`): containers keep their type, leaves are replaced, order holds."""

from __future__ import annotations

import collections
from typing import NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from distlib._tree import fold, is_namedtuple, is_tensor, leaves, map_tree, rebuild


class Batch(NamedTuple):
    x: torch.Tensor
    y: list[object]


def test_namedtuple_ordered_and_default_dicts_keep_their_class() -> None:
    d = collections.defaultdict(list, {"a": torch.ones(1)})
    o = collections.OrderedDict([("b", torch.ones(1)), ("a", torch.zeros(1))])
    out = map_tree(lambda t: t + 1, {"nt": Batch(torch.ones(1), [torch.ones(1), "id"]), "d": d, "o": o})
    assert isinstance(out["nt"], Batch) and out["nt"].y[1] == "id"
    assert torch.equal(out["nt"].x, torch.full((1,), 2.0))
    assert type(out["d"]) is collections.defaultdict and out["d"].default_factory is list
    assert type(out["o"]) is collections.OrderedDict and list(out["o"]) == ["b", "a"]
    assert d["a"].item() == 1.0  # the input is not modified


def test_leaves_in_order_and_other_can_refuse() -> None:
    a, b, c = torch.ones(1), torch.zeros(1), torch.full((1,), 3.0)
    tree = [a, {"k": (b, 7)}, Batch(c, [])]
    assert [t.item() for t in leaves(tree)] == [1.0, 0.0, 3.0]

    def refuse(value: object) -> object:
        raise TypeError(f"leaf {value!r}")

    with pytest.raises(TypeError, match="leaf 7"):
        map_tree(lambda t: t, tree, other=refuse)


def test_leaves_other_sees_every_non_container_value() -> None:
    seen: list[object] = []
    tree = {"a": [torch.ones(1), 7, None], "b": ("s",)}
    assert len(leaves(tree, other=seen.append)) == 1 and seen == [7, None, "s"]
    with pytest.raises(TypeError, match="not a tensor: 7"):
        leaves(tree, other=lambda v: (_ for _ in ()).throw(TypeError(f"not a tensor: {v}")))


def test_fold_reduces_bottom_up_with_each_container_in_hand() -> None:
    def show(x: object, parts: list[str]) -> str:
        name = type(x).__name__
        return f"{name}({', '.join(parts)})"

    tree = collections.OrderedDict(p=Batch(torch.zeros(2), [3]), q=[torch.ones(1)])
    got = fold(lambda v: f"t{list(v.shape)}" if is_tensor(v) else repr(v), show, tree)
    assert got == "OrderedDict(Batch(t[2], list(3)), list(t[1]))"
    assert fold(len, show, "text") == 4  # a lone non-container goes to `leaf`
    assert fold(str, show, ["ab", torch.ones(1)], other=lambda v: "-") == "list(-, tensor([1.]))"


class _Record(dict):  # type: ignore[type-arg]
    """A dict subclass: its copy() is a plain dict, so it is rebuilt from its class."""


def test_a_dict_subclass_keeps_its_class() -> None:
    out = map_tree(lambda t: t * 2, _Record(a=torch.ones(1)))
    assert type(out) is _Record and out["a"].item() == 2.0


def test_importing_the_walker_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, distlib._tree as t; print('torch' in sys.modules, t.is_tensor(1.0), "
            "t.map_tree(str, [1, (2,)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip()
    assert out == "False False [1, (2,)]"


def test_rebuild_and_is_namedtuple() -> None:
    assert rebuild((1, 2), [3, 4]) == (3, 4)
    assert rebuild([1], [2]) == [2]
    assert is_namedtuple(Batch(torch.ones(1), [])) and not is_namedtuple((1, 2))


class _Frozen(collections.abc.Mapping):  # type: ignore[type-arg]
    """A read-only mapping that cannot be built from a dict: rebuilt as a plain dict."""

    def __init__(self) -> None:
        self._a = torch.ones(1)

    def __getitem__(self, key: str) -> object:
        return {"a": self._a}[key]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(["a"])

    def __len__(self) -> int:
        return 1


def test_a_mapping_we_cannot_build_becomes_a_dict() -> None:
    out = map_tree(lambda t: t * 0, _Frozen())
    assert type(out) is dict and out["a"].item() == 0.0


_trees = st.recursive(
    st.floats(allow_nan=False, width=32).map(lambda v: torch.tensor([v])) | st.integers(),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=2), inner, max_size=3),
    max_leaves=12)


@given(_trees)
def test_identity_map_gives_back_an_equal_tree(tree: object) -> None:
    out = map_tree(lambda t: t.clone(), tree)
    assert len(leaves(out)) == len(leaves(tree))
    assert all(torch.equal(p, q) for p, q in zip(leaves(out), leaves(tree), strict=True))
    assert repr(map_tree(lambda t: 0, out)) == repr(map_tree(lambda t: 0, tree))
