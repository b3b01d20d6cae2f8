"""The one walker over nested lists, tuples, namedtuples, mappings and tensors.

Collectives, data placement, dispatch, precision casts and XLA all walk a user's batch or
output the same way: containers are rebuilt with their own type (a namedtuple stays that
namedtuple, an ``OrderedDict`` or a ``defaultdict`` keeps its class and factory, a
``BatchEncoding`` stays one), leaves chosen by ``is_leaf`` are replaced, anything else is
kept as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import torch

__all__ = ["is_namedtuple", "is_tensor", "leaves", "map_tree", "rebuild", "walk"]


def is_tensor(x: object) -> bool:
    """The default leaf: a ``torch.Tensor``."""
    return isinstance(x, torch.Tensor)


def is_namedtuple(x: object) -> bool:
    """A tuple made by ``collections.namedtuple`` or ``typing.NamedTuple``."""
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _children(x: object) -> Iterable[Any] | None:
    """The children of a container, in order; None for anything that is not one."""
    if isinstance(x, Mapping):
        return x.values()
    if isinstance(x, (list, tuple)):
        return x
    return None


def _rebuild_mapping(x: Mapping[Any, Any], values: Iterable[Any]) -> Mapping[Any, Any]:
    pairs = dict(zip(x.keys(), values, strict=True))
    if isinstance(x, MutableMapping) and callable(getattr(x, "copy", None)):
        try:
            out = x.copy()  # keeps the class, a defaultdict's factory, a BatchEncoding's extras
        except Exception:
            out = None
        if isinstance(out, MutableMapping):
            for key, value in pairs.items():
                out[key] = value
            return out
    try:
        return type(x)(pairs)  # type: ignore[call-arg]
    except Exception:
        return pairs


def rebuild(x: Any, values: Iterable[Any]) -> Any:
    """A container of ``x``'s type holding ``values`` in place of its children.

    Examples:
        >>> from collections import namedtuple
        >>> P = namedtuple("P", "a b")
        >>> rebuild(P(1, 2), [3, 4])
        P(a=3, b=4)
        >>> rebuild({"a": 1}, [2])
        {'a': 2}
    """
    if isinstance(x, Mapping):
        return _rebuild_mapping(x, values)
    if is_namedtuple(x):
        return type(x)(*values)
    if isinstance(x, tuple):
        return type(x)(values) if type(x) is not tuple else tuple(values)
    return type(x)(values)


def walk(x: Any, *, is_leaf: Callable[[Any], bool] = is_tensor) -> Iterator[Any]:
    """Yield every leaf and every other non-container value, depth first, in order."""
    if is_leaf(x):
        yield x
        return
    children = _children(x)
    if children is None:
        yield x
        return
    for child in children:
        yield from walk(child, is_leaf=is_leaf)


def leaves(x: Any, *, is_leaf: Callable[[Any], bool] = is_tensor) -> list[Any]:
    """The leaves of ``x`` in order (values that are neither leaves nor containers are skipped).

    Examples:
        >>> leaves({"a": [torch.ones(1), 3], "b": (torch.zeros(2),)})
        [tensor([1.]), tensor([0., 0.])]
    """
    return [v for v in walk(x, is_leaf=is_leaf) if is_leaf(v)]


def map_tree(fn: Callable[[Any], Any], x: Any, *,
             is_leaf: Callable[[Any], bool] = is_tensor,
             other: Callable[[Any], Any] | None = None) -> Any:
    """Apply ``fn`` to every leaf of ``x``, rebuilding each container with its own type.

    Args:
        fn: called on each leaf (by default each tensor).
        x: a leaf, or lists, tuples, namedtuples and mappings nesting leaves.
        is_leaf: what counts as a leaf.
        other: called on every value that is neither a leaf nor a container (default: kept);
            raise from it to refuse such values.

    Examples:
        >>> from collections import namedtuple
        >>> Batch = namedtuple("Batch", "x y")
        >>> map_tree(lambda t: t * 2, Batch(torch.ones(1), [torch.ones(1), "id"]))
        Batch(x=tensor([2.]), y=[tensor([2.]), 'id'])
    """
    if is_leaf(x):
        return fn(x)
    children = _children(x)
    if children is None:
        return x if other is None else other(x)
    return rebuild(x, [map_tree(fn, c, is_leaf=is_leaf, other=other) for c in children])
